"""The Monitor's loop findings (events.jsonl) in the report: listed among the findings with
their evidence, ranked first within their severity, named in the symptoms they explain.

On real runs: the fixtures ``loop_repeated_batch`` (next(iter(loader)) inside the loop) and
``loop_no_zero_grad`` (optimizer.zero_grad() never called), made by make_fixtures.py with the
real Monitor; and, marked slow, the same two bugs in a short loop run here, Monitor
(report=False) then build_report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tdiag.findings import Finding, Severity
from tdiag.history import read_events, read_history
from tdiag.report import build_report
from tdiag.report.rules import evaluate, rank_findings
from tdiag.report.rules.live import LOOP_FINDING_IDS, loop_findings

FIXTURES = Path(__file__).parent / "fixtures"


def _evaluate(name: str, **kw):
    folder = FIXTURES / name
    df, _ = read_history(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return evaluate(df, meta, read_events(folder), **kw)


def _by_id(findings, fid):
    (f,) = [f for f in findings if f.id == fid]
    return f


def test_every_loop_check_of_the_monitor_is_known_to_the_report():
    from tdiag.monitor.loopchecks import LOOP_CHECKS

    assert set(LOOP_CHECKS) <= LOOP_FINDING_IDS


def test_repeated_batch_ranks_first_and_explains_what_it_causes():
    res = _evaluate("loop_repeated_batch")
    ids = [f.id for f in res.findings]
    assert ids[0] == "data.repeated-batch", ids
    first = res.findings[0]
    assert first.severity is Severity.ERROR and first.step == 5
    assert first.evidence["steps"] == [4, 5] and first.evidence["source"] == "events.jsonl"
    assert first.evidence["impact"] == 1.0 and "explained_by" not in first.evidence
    # the model memorised its one batch: val rises, the training loss goes to ~0
    for symptom in ("train.overfitting", "data.label-leak"):
        assert _by_id(res.findings, symptom).evidence["explained_by"] == "data.repeated-batch"


def test_missing_zero_grad_ranks_first_and_explains_the_clipping():
    res = _evaluate("loop_no_zero_grad")
    assert res.findings[0].id == "loop.grad-accumulating"
    assert res.findings[0].evidence["stale_grad_norm"] > 0
    clip = _by_id(res.findings, "train.clipping-frequent")
    assert clip.evidence["explained_by"] == "loop.grad-accumulating"


def test_a_zero_lr_explains_params_not_updated_not_the_reverse():
    res = _evaluate("lr_zero_short")  # the LR is exactly 0 from step 10: nothing updates
    stuck = _by_id(res.findings, "loop.params-not-updated")
    low = _by_id(res.findings, "train.lr-too-low")
    assert stuck.evidence["explained_by"] == "train.lr-too-low"
    assert "explained_by" not in low.evidence
    assert res.findings[0] is stuck  # an error: severity still ranks first


def test_report_json_and_html_list_the_loop_finding(tmp_path):
    report = build_report(FIXTURES / "loop_repeated_batch", out=tmp_path)
    (f,) = [f for f in report["findings"] if f["id"] == "data.repeated-batch"]
    assert report["findings"][0] is f
    assert f["evidence"]["steps"] == [4, 5] and f["docs"] == "docs/checks.md#data-repeated-batch"
    assert report["summary"]["errors"] >= 1
    assert [a["id"] for a in report["live_alerts"]] == ["data.repeated-batch"]  # still listed
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["findings"][0]["id"] == "data.repeated-batch"
    html = (tmp_path / "report.html").read_text()
    article = re.search(
        r'<article class="finding error" id="finding-1">(.*?)</article>', html, re.S
    )
    assert article and "data.repeated-batch" in article.group(1)
    assert "<dt>steps</dt><dd>[4, 5]</dd>" in article.group(1)
    assert '(<a href="#finding-1">finding 1</a>)' in html  # the live alert links to it


def test_loop_findings_rank_first_within_their_severity():
    def f(fid, sev, impact):
        return Finding(id=fid, severity=sev, title=fid, step=10, evidence={"impact": impact})

    ranked = rank_findings(
        [
            f("train.divergence", Severity.ERROR, 1.0),
            f("train.plateau", Severity.WARNING, 1.0),
            f("loop.train-mode-eval", Severity.WARNING, 0.1),
            f("loop.eval-mode-training", Severity.ERROR, 0.1),
        ]
    )
    assert [x.id for x in ranked] == [
        "loop.eval-mode-training",
        "train.divergence",
        "loop.train-mode-eval",
        "train.plateau",
    ]
    plateau = ranked[-1]
    assert plateau.evidence["explained_by"] == "loop.eval-mode-training"  # an error explains it


def test_loop_findings_from_events_keep_their_evidence_once_per_id():
    events = [
        {"id": "loop.clip-after-step", "severity": "error", "title": "t", "step": 30,
         "evidence": {"clip_threshold": 1.0, "impact": 0.4}},
        {"id": "loop.clip-after-step", "severity": "error", "title": "again", "step": 60},
        {"id": "train.nonfinite-grad", "severity": "error", "title": "not a loop check"},
        {"id": "loop.future-check", "severity": "warning", "title": "a newer Monitor"},
        {"not": "a finding"},
    ]  # fmt: skip
    out = loop_findings(events)
    assert [(x.id, x.step) for x in out] == [
        ("loop.clip-after-step", 30),
        ("loop.future-check", None),
    ]
    assert out[0].evidence == {"clip_threshold": 1.0, "impact": 0.4, "source": "events.jsonl"}
    assert out[1].evidence["impact"] == 1.0


def test_only_filters_loop_findings_too():
    res = _evaluate("loop_repeated_batch", only=["train.overfitting"])
    assert [f.id for f in res.findings] == ["train.overfitting"]
    res = _evaluate("loop_repeated_batch", only=["data.repeated-batch"])
    assert [f.id for f in res.findings] == ["data.repeated-batch"]


# ------------------------------------------------------------------------ live, real loops
def _loop(run_dir: Path, bug: str, steps: int = 100) -> None:
    """A small nanoGPT-style loop with the Monitor, planted ``bug``."""
    import torch

    from reference_model.config import ModelConfig
    from reference_model.data import load_corpus, token_stream
    from reference_model.model import Transformer
    from tdiag import Monitor

    torch.manual_seed(0)
    corpus = load_corpus(None, max_bytes=60_000)  # the standard library's sources, as bytes
    data = token_stream(corpus.train)[: 64 * 32].long().view(64, 32)  # 8 batches of 8 x 32
    held_out = token_stream(corpus.val)[: 8 * 32].long().view(8, 32)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Transformer(ModelConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kw = {"tensorboard": False, "console": False, "quiet": True, "handle_signals": False}
    with Monitor(
        model, optimizer=opt, run_dir=str(run_dir), log_every=5, report=False, **kw
    ) as mon:
        it = iter(loader)
        for step in range(steps):
            if step % 10 == 0:
                with torch.no_grad():
                    model.eval()
                    mon.log({"val/loss": model(held_out, labels=held_out).loss.item()})
                    model.train()
            if bug == "repeated-batch":
                ids = next(iter(loader))  # the bug: a fresh iterator, its first batch
            else:
                ids = next(it, None)
                if ids is None:
                    it = iter(loader)
                    ids = next(it)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            if bug != "no-zero-grad":
                opt.zero_grad(set_to_none=True)
            mon.step(loss.detach(), tokens=ids.numel())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bug", "fid", "symptoms"),
    [
        ("repeated-batch", "data.repeated-batch", ("train.overfitting", "data.label-leak")),
        ("no-zero-grad", "loop.grad-accumulating", ("train.plateau", "train.lr-too-high")),
    ],
)
def test_a_real_loop_bug_comes_first_in_the_report(tmp_path, bug, fid, symptoms):
    _loop(tmp_path / "run", bug)
    report = build_report(tmp_path / "run", out=tmp_path / "out")
    ids = [f["id"] for f in report["findings"]]
    assert ids[0] == fid, ids
    assert report["findings"][0]["evidence"]["source"] == "events.jsonl"
    # what it caused on the curves (repeated batch: val rising, overfitting; no zero_grad: the
    # loss stalls) names it
    explained = {f["id"] for f in report["findings"] if f["evidence"].get("explained_by") == fid}
    assert explained & set(symptoms), ids
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"<code>{fid}</code>" in html.split('id="finding-1"', 1)[1].split("</article>", 1)[0]
