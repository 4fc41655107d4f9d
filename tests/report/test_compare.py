"""``tdiag compare`` and ``tdiag report RUN_A RUN_B``: the analysis (config/environment
diff, findings diff, where the loss curves separate, throughput side by side, the overlay
axis), compare.json, the page (CSP, hostile names inert) and the CLI.

Real runs: ``fixtures/compare_seed0`` / ``compare_seed1`` (one config, two seeds: must not
separate) and ``compare_lr_jump`` (compare_seed0 with a 30x LR from step 100: the same run
up to there), made by ``fixtures/make_fixtures.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest

from tdiag.history import HistoryWriter
from tdiag.report.compare import (
    COMPARE_SCHEMA,
    compare_runs,
    diff_mappings,
    findings_diff,
    load_run,
    loss_separation,
    overlay_axis,
)
from tdiag.report.compare_page import build_compare, compare_command

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------ where curves separate
def _loss(steps, rng, *, tau=60.0, sigma=0.08, offset=0.0):
    return 1.5 + 4.0 * np.exp(-steps / tau) + offset + rng.normal(0, sigma, len(steps))


@pytest.mark.parametrize("seed", range(6))
def test_runs_that_share_a_prefix_separate_just_after_it(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 1000, 5.0)
    a = _loss(steps, rng)
    b = a.copy()  # same batches, same weights up to step 500 …
    after = steps >= 500
    # … then a larger LR: the loss rises by 0.3 nats over 50 steps and stays up
    b[after] += 0.3 * np.minimum(1.0, (steps[after] - 500) / 50) + rng.normal(0, 0.05, after.sum())
    sep = loss_separation(steps, a, steps, b)
    assert sep.step is not None and 500 <= sep.step <= 560, sep
    assert sep.diff > 0


@pytest.mark.parametrize("seed", range(12))
def test_two_seeds_of_one_config_do_not_separate(seed):
    rng = np.random.default_rng(100 + seed)
    steps = np.arange(0, 2000, 10.0)
    # another init and data order: own noise, a slightly different speed early on, and a
    # small systematic offset (a few hundredths of a nat)
    a = _loss(steps, rng, tau=60 * (1 + rng.normal(0, 0.05)), offset=rng.normal(0, 0.01))
    b = _loss(steps, rng, tau=60 * (1 + rng.normal(0, 0.05)), offset=rng.normal(0, 0.01))
    sep = loss_separation(steps, a, steps, b)
    assert sep.step is None, sep


def test_a_single_spike_in_one_run_is_not_a_separation():
    rng = np.random.default_rng(7)
    steps = np.arange(0, 500, 5.0)
    a = _loss(steps, rng)
    b = _loss(steps, rng)
    b[40:42] += 3.0  # two bad batches
    assert loss_separation(steps, a, steps, b).step is None


def test_separation_on_interleaved_steps_and_too_few_points():
    rng = np.random.default_rng(3)
    sa, sb = np.arange(0, 600, 4.0), np.arange(2, 600, 6.0)  # logged at other steps
    a = _loss(sa, rng, sigma=0.03)
    b = _loss(sb, rng, sigma=0.03) + np.where(sb >= 300, 0.5, 0.0)
    sep = loss_separation(sa, a, sb, b)
    assert sep.step is not None and 290 <= sep.step <= 340
    short = loss_separation(sa[:5], a[:5], sb[:5], b[:5])
    assert short.step is None and "fewer than" in short.reason


def test_real_runs_two_seeds_do_not_separate_and_a_shared_prefix_does():
    seed0, seed1, jump = (load_run(FIXTURES / n) for n in
                          ("compare_seed0", "compare_seed1", "compare_lr_jump"))  # fmt: skip
    info = compare_runs([seed0, seed1, jump])
    by_b = {s["b"]: s for s in info["loss_separation"]}
    assert by_b["compare_seed1"]["step"] is None
    # the LR jumped after step 100: never before, and within 50 steps (10 logged points)
    assert 100 <= by_b["compare_lr_jump"]["step"] <= 150
    assert [d["key"] for d in info["config_diff"]] == ["seed"]
    assert info["config_diff"][0]["values"] == [0, 1, 0]


# ------------------------------------------------------------------------ the diffs
def test_diff_mappings_lists_only_what_changed_and_what_is_absent():
    a = {"lr": 1e-3, "model": {"d": 64, "layers": 2}, "seed": 0, "steps": 100}
    b = {"lr": 3e-3, "model": {"d": 64, "layers": 2}, "seed": 0, "steps": 100.0, "bf16": True}
    diff = diff_mappings([a, b])
    assert diff == [
        {"key": "lr", "values": [1e-3, 3e-3]},
        {"key": "bf16", "values": [{"absent": True}, True]},
    ]
    assert diff_mappings([a, dict(a)]) == []
    assert diff_mappings([{"x": True}, {"x": 1}]) == [{"key": "x", "values": [True, 1]}]


def test_findings_present_in_one_run_and_not_the_other():
    healthy, slow = load_run(FIXTURES / "healthy"), load_run(FIXTURES / "slowing_step")
    diff = findings_diff([healthy, slow])
    ids = {d["id"]: d for d in diff}
    assert "perf.throughput-degradation" in ids
    d = ids["perf.throughput-degradation"]
    assert d["in"] == ["slowing_step"] and d["not_in"] == ["healthy"]
    assert d["steps"]["slowing_step"] is not None
    common = {f.id for f in healthy.findings} & {f.id for f in slow.findings}
    assert not common & set(ids)  # a finding in both runs is not a difference


def test_overlay_by_tokens_when_batch_sizes_differ(tmp_path):
    runs = []
    for name, batch in (("small", 8), ("big", 32)):
        folder = tmp_path / name
        with HistoryWriter(folder / "history.jsonl") as w:
            for step in range(1, 61):
                w.write({"step": step, "train/loss": 5.0 / step**0.3,
                         "train/tokens": step * batch * 128})  # fmt: skip
        (folder / "meta.json").write_text(json.dumps({"config": {"batch_size": batch}}))
        runs.append(load_run(folder))
    axis, tps = overlay_axis(runs)
    assert axis == "tokens" and tps == [8 * 128, 32 * 128]
    info = compare_runs(runs)
    assert info["axis"] == "tokens"
    assert info["loss_separation"][0]["axis"] == "tokens"
    same = [runs[0], load_run(tmp_path / "small")]
    assert overlay_axis(same)[0] == "step"


# ------------------------------------------------------------- JSON, page and CLI
def test_compare_json_and_page(tmp_path):
    info, written = build_compare(
        [FIXTURES / "compare_seed0", FIXTURES / "compare_lr_jump"], tmp_path / "cmp"
    )
    assert written == [tmp_path / "cmp" / "compare.json", tmp_path / "cmp" / "compare.html"]
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data == json.loads(json.dumps(info))  # the file is the returned object
    assert data["compare_schema"] == COMPARE_SCHEMA == 1
    assert [r["name"] for r in data["runs"]] == ["compare_seed0", "compare_lr_jump"]
    assert {p["key"] for p in data["perf"]} >= {"tokens_per_sec", "step_time_s", "rss_gb"}
    tp = next(p for p in data["perf"] if p["key"] == "tokens_per_sec")
    assert len(tp["values"]) == 2 and tp["ratio_to_first"][0] == 1.0
    html = (tmp_path / "cmp" / "compare.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    csp = unescape(csp)
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "http" not in csp
    assert re.search(r"<script(?![^>]*type=\"application/json\")[^>]*\bsrc=", html) is None
    assert 'data-tdiag-chart="loss"' in html and 'data-tdiag-chart="throughput"' in html
    assert "compare_lr_jump leaves compare_seed0 at step" in html
    # the separation is marked on the loss chart's data
    charts = json.loads(re.search(r'id="tdiag-charts">(.*?)</script>', html, re.S).group(1))
    assert charts["loss"]["marks"], charts["loss"].keys()


def _hostile_run(folder: Path, name: str, lr: float) -> None:
    with HistoryWriter(folder / "history.jsonl") as w:
        for step in range(1, 41):
            w.write({"step": step, "train/loss": 4.0 / step**0.5, "perf/tokens_per_sec": 1e4,
                     f"grad_norm/{name}": 1.0})  # fmt: skip
    meta = {"name": name, "config": {"lr": lr, name: "<b>x</b>"}, "environment": {"host": name}}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_hostile_run_names_render_inert(tmp_path):
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>"</script><!--'
    _hostile_run(tmp_path / "a", evil, 1e-3)
    _hostile_run(tmp_path / "b", evil + "&2", 3e-3)
    build_compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    html = (tmp_path / "out" / "compare.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)" in html  # shown, escaped
    # every script element is either JSON data or one of the hashed assets
    n_json = len(re.findall(r'<script type="application/json"', html))
    assert html.count("<script") == n_json + 2
    json_block = re.search(r'id="tdiag-charts">(.*?)</script>', html, re.S).group(1)
    assert "<" not in json_block and ">" not in json_block


def test_compare_cli_exit_codes_and_json(tmp_path, capsys):
    code = compare_command(
        [FIXTURES / "compare_seed0", FIXTURES / "compare_seed1"], out=tmp_path, json_out=True
    )
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["compare_schema"] == 1 and obj["loss_separation"][0]["step"] is None
    assert compare_command([FIXTURES / "compare_seed0"], out=tmp_path, json_out=False) == 2
    bad = compare_command([FIXTURES / "compare_seed0", tmp_path / "nope"], out=tmp_path,
                          json_out=False)  # fmt: skip
    assert bad == 2 and "nope" in capsys.readouterr().err


def test_report_of_several_runs_links_each_report_to_the_comparison(tmp_path):
    for name in ("compare_seed0", "compare_lr_jump"):
        shutil.copytree(FIXTURES / name, tmp_path / "runs" / name)
    a, b = tmp_path / "runs" / "compare_seed0", tmp_path / "runs" / "compare_lr_jump"
    proc = subprocess.run(
        [sys.executable, "-m", "tdiag.cli", "report", str(a), str(b)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "runs" / "compare" / "compare.html"
    assert target.exists() and str(target) in proc.stdout
    for run in (a, b):
        html = (run / "report.html").read_text()
        assert 'id="compare-link"' in html and 'href="../compare/compare.html"' in html
        assert (run / "report.json").exists()
    page = target.read_text()
    assert 'href="../compare_seed0/report.html"' in page


def test_report_of_several_runs_with_out_and_an_unreadable_one(tmp_path, capsys):
    from tdiag.report.compare_page import reports_command

    runs = [FIXTURES / "compare_seed0", FIXTURES / "compare_seed1", tmp_path / "missing"]
    code = reports_command(runs, json_out=True, out=tmp_path / "out", fail_on=None)
    captured = capsys.readouterr()
    assert code == 2 and "missing" in captured.err  # named, and the others still written
    obj = json.loads(captured.out)
    assert len(obj["reports"]) == 2 and obj["compare"]["compare_schema"] == 1
    for name in ("compare_seed0", "compare_seed1"):
        html = (tmp_path / "out" / name / "report.html").read_text()
        assert 'href="../compare/compare.html"' in html
    assert (tmp_path / "out" / "compare" / "compare.json").exists()
    assert not (FIXTURES / "compare_seed0" / "report.html").exists()  # --out: fixtures untouched
    bad = reports_command(runs[:2], json_out=False, out=tmp_path / "o2", fail_on="sometimes")
    assert bad == 2
