"""``perf.throughput-degradation``: slow stretches anywhere in the run, not only at the end.

Positives: a synthetic history shaped like the demo that was throttled mid-run (6-7.6k
tokens/s, then 280-900 for 400 steps, then recovered), and a real run of the reference
trainer throttled from step 100 to 200 (``fixtures/throttled_midrun``, made by
``fixtures/make_fixtures.py``). Negatives: healthy noisy histories of several seeds,
short dips, a slow warm-up, and the real healthy fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tdiag.findings import Severity
from tdiag.history import read_history
from tdiag.report.rules import evaluate
from tdiag.report.rules._slow import moved_with, slow_stretches

FIXTURES = Path(__file__).parent / "fixtures"
RULE = "perf.throughput-degradation"


def _findings(df: pd.DataFrame, kind: str | None = "slow_stretch"):
    res = evaluate(df, {}, only=[RULE])
    assert not res.skipped, res.skipped
    return [f for f in res.findings if kind is None or f.evidence.get("kind") == kind]


def throttled_history(seed: int = 0, *, slow=(140, 540), n: int = 700) -> pd.DataFrame:
    """Like the demo: ~7k tokens/s, 85 % CPU, 0.3 s steps; from ``slow[0]`` to ``slow[1]``
    280-900 tokens/s at 20 % CPU (other jobs took the machine); then recovered."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, n + 1)
    inside = (step >= slow[0]) & (step < slow[1])
    tps = np.where(inside, rng.uniform(280, 900, n), rng.uniform(6000, 7600, n))
    tps[:5] *= 0.3  # warm-up
    cpu = np.where(inside, 20.0, 85.0) + rng.normal(0, 3, n)
    tokens = 2048
    return pd.DataFrame(
        {
            "step": step,
            "train/loss": 5.0 * np.exp(-step / 300) + 1 + rng.normal(0, 0.05, n),
            "perf/tokens_per_sec": tps,
            "perf/step_time": tokens / tps,
            "perf/data_time": rng.uniform(0.001, 0.002, n),
            "sys/cpu_percent": cpu,
        }
    )


def healthy_history(seed: int, n: int = 400, every: int = 5) -> pd.DataFrame:
    """A healthy run on a shared machine: lognormal noise (sigma 0.3), a slowly wandering
    speed (other jobs come and go: a random walk of +-40 %), rare fast or slow single points,
    and a slow first few steps."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, n + 1) * every
    walk = np.cumsum(rng.normal(0, 0.03, n))
    walk = 0.35 * walk / max(1e-9, np.abs(walk).max())
    tps = 12000 * np.exp(walk + rng.normal(0, 0.3, n))
    odd = rng.random(n) < 0.03
    tps[odd] *= rng.choice([0.2, 3.0], odd.sum())
    tps[:3] *= 0.25
    return pd.DataFrame(
        {
            "step": step,
            "perf/tokens_per_sec": tps,
            "perf/step_time": 4096 / tps,
            "sys/cpu_percent": 30 + rng.normal(0, 5, n),
        }
    )


def test_a_mid_run_slow_stretch_that_recovers_is_named_with_its_range():
    df = throttled_history()
    (f,) = _findings(df)
    assert f.severity is Severity.WARNING
    lo, hi = f.evidence["step_range"]
    assert abs(lo - 140) <= 3 and abs(hi - 539) <= 3, (lo, hi)
    assert f.step == lo
    assert f.evidence["recovered"] is True
    assert f.evidence["frac_of_peak"] < 0.15
    assert 6000 < f.evidence["peak"] < 7700
    moved = f.evidence["moved_with"]
    assert moved["sys/cpu_percent"]["inside"] < 25 < 80 < moved["sys/cpu_percent"]["outside"]
    assert moved["perf/step_time"]["ratio"] > 5
    assert 0.8 < moved["perf/data_time"]["ratio"] < 1.25  # did not move: not a loader stall
    assert "CPU use" in f.message and "step time" in f.message and "data time" not in f.message
    assert "other jobs" in f.recommendation
    # most of the run's wall time went into the stretch
    assert f.evidence["time_lost_frac"] > 0.5
    # the first-vs-last-quarter comparison alone never saw it
    assert _findings(df, kind="trend") == []


def test_the_step_time_alone_is_enough():
    df = throttled_history(3).drop(columns=["perf/tokens_per_sec"])
    (f,) = _findings(df)
    assert f.evidence["source"] == "1/perf/step_time"
    lo, hi = f.evidence["step_range"]
    assert abs(lo - 140) <= 3 and abs(hi - 539) <= 3


def test_two_stretches_are_two_findings_in_step_order():
    df = throttled_history(1, slow=(150, 250), n=800)
    late = (df["step"] >= 500) & (df["step"] < 600)
    df.loc[late, "perf/tokens_per_sec"] /= 10
    found = _findings(df)
    assert [f.evidence["step_range"][0] for f in found] == pytest.approx([150, 500], abs=3)


def test_a_slowdown_to_the_end_is_reported_as_not_recovered():
    df = throttled_history(2, slow=(400, 10_000), n=700)
    found = _findings(df, kind=None)
    stretch = [f for f in found if f.evidence["kind"] == "slow_stretch"]
    trend = [f for f in found if f.evidence["kind"] == "trend"]
    assert len(found) == 1  # one phenomenon, one finding
    if stretch:
        assert stretch[0].evidence["recovered"] is False
        assert "until the end of the run" in stretch[0].message
    else:
        assert trend[0].step >= 380


@pytest.mark.parametrize("seed", range(8))
def test_healthy_noisy_runs_are_silent(seed):
    assert _findings(healthy_history(seed), kind=None) == []


@pytest.mark.parametrize("seed", range(4))
def test_short_dips_and_a_slow_warm_up_are_silent(seed):
    df = healthy_history(seed)
    tps = df["perf/tokens_per_sec"].to_numpy().copy()
    for start in (100, 250):  # 3 points at a fifth of the speed: a checkpoint save, say
        tps[start : start + 3] /= 5
    tps[:30] /= 4  # warm-up longer than the 10 % the rules skip
    df["perf/tokens_per_sec"] = tps
    assert _findings(df) == []


@pytest.mark.parametrize("name", ["healthy", "nano_healthy", "data_shuffled", "dist_healthy"])
def test_real_healthy_runs_are_silent(name):
    df, _ = read_history(FIXTURES / name / "history.jsonl")
    assert _findings(df) == []


def test_a_real_run_throttled_mid_run_is_found():
    """The reference trainer, steps 100-200 sleeping 40 ms each (make_fixtures.py)."""
    df, _ = read_history(FIXTURES / "throttled_midrun" / "history.jsonl")
    (f,) = _findings(df)
    lo, hi = f.evidence["step_range"]
    assert 90 <= lo <= 115 and 185 <= hi <= 210, (lo, hi)
    assert f.evidence["recovered"] is True
    assert f.evidence["frac_of_peak"] < 0.5
    assert f.evidence["moved_with"]["perf/step_time"]["ratio"] > 2
    assert f.evidence["moved_with"]["sys/cpu_percent"]["ratio"] < 0.5  # it slept
    assert f.severity is Severity.WARNING
    # its data time rose too (0.1 -> 0.3 ms), but beside a step 8x slower that is not it
    assert "input pipeline" not in f.recommendation and "other jobs" in f.recommendation


def test_a_stretch_whose_data_time_explains_it_points_at_the_loader():
    df = throttled_history(4)
    inside = (df["step"] >= 140) & (df["step"] < 540)
    df.loc[inside, "perf/data_time"] = df.loc[inside, "perf/step_time"] * 0.9
    df["sys/cpu_percent"] = 85.0
    (f,) = _findings(df)
    assert "input pipeline" in f.recommendation
    assert "data time" in f.message


def test_slow_stretches_rejects_a_bad_fraction_and_short_series():
    s = pd.Series(np.ones(50), index=np.arange(50))
    with pytest.raises(ValueError, match="frac"):
        slow_stretches(s, frac=1.5, min_points=5, z=4)
    assert slow_stretches(s.iloc[:8], frac=0.5, min_points=5, z=4) == []


def test_moved_with_compares_inside_and_outside_the_stretch_without_warm_up():
    s = pd.Series([100.0] * 10 + [10.0] * 10 + [50.0] * 10, index=np.arange(30))
    m = moved_with({"x": s}, 10, 19, exclude=(0, 4))
    assert m["x"]["inside"] == 10.0
    assert m["x"]["outside"] == 50.0  # rows 5-9 (100) and 20-29 (50): median of 15 values
    assert m["x"]["ratio"] == pytest.approx(0.2)


def test_the_throttled_run_fails_a_fail_on_warning_gate(tmp_path, capsys):
    """The demo's complaint: "no findings", and `--fail-on warning` exited 0."""
    from tdiag.history import HistoryWriter
    from tdiag.report import report_command

    for name, df in (("throttled", throttled_history(5)), ("steady", healthy_history(5))):
        with HistoryWriter(tmp_path / name / "history.jsonl") as w:
            for row in df.to_dict("records"):
                w.write({**row, "step": int(row["step"])})
    assert report_command(tmp_path / "throttled", json_out=True, out=None, fail_on="warning") == 1
    report = json.loads(capsys.readouterr().out)
    assert RULE in {f["id"] for f in report["findings"]}
    assert report_command(tmp_path / "steady", json_out=True, out=None, fail_on="warning") == 0
