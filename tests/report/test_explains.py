"""Cause before symptom: ``tdiag.report.rules.explains`` on real fixtures and on hand-made
findings (ordering within a severity, ``evidence["explained_by"]``, the pair conditions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.history import read_events, read_history
from tdiag.report.rules import EXPLAINS, RULES, evaluate, rank_findings
from tdiag.report.rules.explains import apply_explains
from tdiag.report.rules.live import LOOP_FINDING_IDS

FIXTURES = Path(__file__).parent / "fixtures"


def _evaluate(name: str):
    folder = FIXTURES / name
    df, _ = read_history(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return evaluate(df, meta, read_events(folder))


def _f(fid: str, sev: Severity = Severity.WARNING, impact: float = 0.5, step=10, **ev) -> Finding:
    return Finding(id=fid, severity=sev, title=fid, step=step, evidence={"impact": impact, **ev})


def test_every_pair_names_registered_rules():
    # a cause or symptom is a report rule or one of the Monitor's loop findings
    for rel in EXPLAINS:
        assert rel.cause in RULES or rel.cause in LOOP_FINDING_IDS, rel
        assert rel.symptom in RULES or rel.symptom in LOOP_FINDING_IDS, rel
        assert rel.cause != rel.symptom


def test_lr_too_low_ranks_before_the_plateau_it_explains():
    res = _evaluate("lr_too_low")
    ids = [f.id for f in res.findings]
    assert ids[0] == "train.lr-too-low", ids
    assert ids.index("train.lr-too-low") < ids.index("train.plateau")
    (plateau,) = [f for f in res.findings if f.id == "train.plateau"]
    assert plateau.evidence["explained_by"] == "train.lr-too-low"
    # the plateau's own numbers still rank it higher: only the explains relation moved it
    (low,) = [f for f in res.findings if f.id == "train.lr-too-low"]
    assert plateau.evidence["impact"] > low.evidence["impact"]
    assert "explained_by" not in low.evidence
    json.dumps([f.to_dict() for f in res.findings], allow_nan=False)


def test_plateau_without_a_cause_has_no_explained_by():
    steps = np.arange(1, 301)
    rng = np.random.default_rng(0)
    loss = 2 + 3 * np.exp(-steps / 30) + rng.normal(0, 0.01, len(steps))
    df = pd.DataFrame({"step": steps, "train/loss": loss, "train/lr": np.full(len(steps), 1e-3)})
    res = evaluate(df, {})
    ids = [f.id for f in res.findings]
    assert "train.plateau" in ids and "train.lr-too-low" not in ids, ids
    (plateau,) = [f for f in res.findings if f.id == "train.plateau"]
    assert "explained_by" not in plateau.evidence


def test_healthy_fixture_findings_are_never_explained():
    for name in ("healthy", "data_stall", "mem_leak"):
        for f in _evaluate(name).findings:
            assert "explained_by" not in f.evidence, (name, f.id)


def test_same_severity_cause_moves_ahead_and_chains_hold():
    mfu = _f("perf.low-mfu", impact=0.9)
    util = _f("perf.gpu-underutilized", impact=0.7)
    stall = _f("perf.data-stall", impact=0.3)
    other = _f("train.overfitting", impact=0.5)
    out = rank_findings([stall, other, util, mfu])
    ids = [f.id for f in out]
    assert ids.index("perf.data-stall") < ids.index("perf.gpu-underutilized")
    assert ids.index("perf.gpu-underutilized") < ids.index("perf.low-mfu")
    by = {f.id: f.evidence.get("explained_by") for f in out}
    # the best-ranked cause is named when several apply
    assert by["perf.low-mfu"] == "perf.gpu-underutilized"
    assert by["perf.gpu-underutilized"] == "perf.data-stall"
    assert by["perf.data-stall"] is None and by["train.overfitting"] is None
    assert len(out) == 4


def test_a_lower_severity_cause_is_not_raised_but_is_named():
    div = _f("train.divergence", Severity.ERROR, impact=0.2, step=155)
    high = _f("train.lr-too-high", impact=0.9, step=155, signs=["divergence"])
    out = rank_findings([high, div])
    assert [f.id for f in out] == ["train.divergence", "train.lr-too-high"]
    assert out[0].evidence["explained_by"] == "train.lr-too-high"


def test_pair_conditions():
    # spikes the LR rule did not count (it had a warmup): not explained
    spikes = _f("train.loss-spikes", impact=0.9, step=50)
    high = _f("train.lr-too-high", impact=0.1, step=5, signs=["loss rose early in training"])
    out = apply_explains([spikes, high])
    assert [f.id for f in out] == ["train.loss-spikes", "train.lr-too-high"]
    assert "explained_by" not in out[0].evidence
    counted = _f("train.lr-too-high", impact=0.1, step=5, signs=["3 loss spikes"])
    out = apply_explains([spikes, counted])
    assert [f.id for f in out] == ["train.lr-too-high", "train.loss-spikes"]
    assert out[1].evidence["explained_by"] == "train.lr-too-high"
    # a divergence before the first NaN is its run-up, not its consequence
    nan = _f("train.nonfinite-loss", Severity.ERROR, impact=1.0, step=120)
    early = _f("train.divergence", Severity.ERROR, impact=0.4, step=100)
    late = _f("train.divergence", Severity.ERROR, impact=0.4, step=130)
    assert "explained_by" not in apply_explains([nan, early])[1].evidence
    assert apply_explains([nan, late])[1].evidence["explained_by"] == "train.nonfinite-loss"
    # a host-RSS leak does not fill the GPU; a GPU leak does
    cap = _f("mem.near-capacity", impact=0.9, step=200)
    rss = _f("mem.leak", impact=0.2, step=20, metric="sys/rss_gb")
    gpu = _f("mem.leak", impact=0.2, step=20, metric="sys/gpu_mem_allocated_gb")
    assert [f.id for f in apply_explains([cap, rss])] == ["mem.near-capacity", "mem.leak"]
    out = apply_explains([cap, rss, gpu])
    assert [f.evidence.get("metric") for f in out] == [
        "sys/gpu_mem_allocated_gb",
        None,
        "sys/rss_gb",
    ]
    assert out[1].evidence["explained_by"] == "mem.leak"


def test_inputs_are_not_mutated():
    plateau = _f("train.plateau", impact=1.0, step=1)
    low = _f("train.lr-too-low", impact=0.5, step=300)
    out = apply_explains([plateau, low])
    assert "explained_by" not in plateau.evidence
    assert out[1].evidence["explained_by"] == "train.lr-too-low"
