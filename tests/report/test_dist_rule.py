"""``dist.straggler`` on per-rank data/compute times.

UNIT TESTS OF THE RULE'S LOGIC on small synthetic histories (hand-made DataFrames with the
Monitor's column names). The real proof that the Monitor's per-rank times name a straggler
is tests/loops/test_torchrun_loop.py (two gloo ranks, one with a slow loader); the
step-time-gap fallback is also covered by the real-run fixtures in test_rules.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tdiag.findings import Severity
from tdiag.report.rules import evaluate

N = 30  # logged rows


def _history(
    data: list[float] | np.ndarray,
    compute: list[float] | np.ndarray,
    *,
    step_time: float,
    n: int = N,
    noise: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """A synthetic history: per-rank seconds (``data[r]``, ``compute[r]``) on every row, times
    (1 + ``noise`` × U(-1, 1)), and the step-time columns the Monitor writes beside them."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {"step": np.arange(1, n + 1) * 10}
    totals = []
    for rank, (d, c) in enumerate(zip(data, compute, strict=True)):
        d_r = np.broadcast_to(np.asarray(d, float), (n,)) * (1 + noise * rng.uniform(-1, 1, n))
        c_r = np.broadcast_to(np.asarray(c, float), (n,)) * (1 + noise * rng.uniform(-1, 1, n))
        cols[f"dist/data_time/{rank}"], cols[f"dist/compute_time/{rank}"] = d_r, c_r
        totals.append(d_r + c_r)
    own = np.vstack(totals)
    cols["perf/step_time"] = np.full(n, step_time)
    cols["dist/step_time_max"] = np.full(n, step_time)
    cols["dist/step_time_min"] = np.full(n, step_time * 0.99)
    cols["dist/slowest_rank"] = own.argmax(axis=0).astype(float)
    return pd.DataFrame(cols)


def _straggler(df: pd.DataFrame):
    res = evaluate(df, {}, only=["dist.straggler"])
    found = [f for f in res.findings if f.id == "dist.straggler"]
    return found, res.skipped


def test_a_rank_with_a_slow_loader_is_named_with_its_data_time():
    df = _history([1e-4, 0.050], [0.002, 0.002], step_time=0.075, noise=0.05)
    (f,), _ = _straggler(df)
    assert f.severity == Severity.WARNING
    ev = f.evidence
    assert ev["slowest_rank"] == 1 and ev["fastest_rank"] == 0 and ev["cause"] == "data"
    assert ev["data_time_s"]["1"] == pytest.approx(0.050, rel=0.05)
    assert ev["data_time_s"]["0"] == pytest.approx(1e-4, rel=0.05)
    assert set(ev["compute_time_s"]) == {"0", "1"}
    assert ev["excess_s"] == pytest.approx(0.050, rel=0.05)
    assert ev["slowest_rank_share"] == 1.0
    assert ev["step_range"][0] > 10 and ev["step_range"][1] == 10 * N  # warm-up left out
    assert "waiting for its batches" in f.message and "rank 1" in f.title
    assert "DataLoader" in f.recommendation
    assert f.where is None  # the rank is evidence, not a module path


def test_a_rank_with_a_slow_forward_is_named_with_its_compute_time():
    compute = [0.010, 0.010, 0.030, 0.010]  # 4 ranks, rank 2 three times slower
    df = _history([1e-4] * 4, compute, step_time=0.050, noise=0.1)
    (f,), _ = _straggler(df)
    assert f.evidence["slowest_rank"] == 2 and f.evidence["cause"] == "compute"
    assert f.evidence["compute_time_s"]["2"] == pytest.approx(0.030, rel=0.1)
    assert len(f.evidence["data_time_s"]) == 4
    assert "forward" in f.message and "device" in f.recommendation


def test_balanced_ranks_taking_turns_are_not_a_straggler():
    df = _history([2e-4, 2e-4], [0.002, 0.002], step_time=0.025, noise=0.3)
    assert _straggler(df) == ([], [])


def test_a_large_ratio_on_microseconds_is_below_the_floor():
    # rank 1's data time is 40x rank 0's and it is always the slowest, but the excess
    # (0.8 ms) is under 5 % of the 50 ms step
    df = _history([2e-5, 8e-4], [0.002, 0.002], step_time=0.050)
    assert _straggler(df) == ([], [])
    # the same excess on a 10 ms step is 8 % of it: reported
    (f,), _ = _straggler(_history([2e-5, 8e-4], [0.002, 0.002], step_time=0.010))
    assert f.evidence["slowest_rank"] == 1


def test_under_twenty_percent_above_the_fastest_is_not_a_straggler():
    # rank 1 always slower, by 15 % of the fastest (and 15 % of the step): below RANK_EXCESS
    df = _history([0.0, 0.0], [0.020, 0.023], step_time=0.020)
    assert _straggler(df) == ([], [])


def test_a_rank_slow_on_only_some_rows_is_not_a_straggler():
    # rank 1's median is far above rank 0's, but it is the slowest on 60 % of rows only
    slow = np.where(np.arange(N) % 5 < 3, 0.020, 0.005)
    df = _history([0.0, 0.0], [np.full(N, 0.010), slow], step_time=0.030)
    assert _straggler(df) == ([], [])


def test_slowest_on_every_row_but_clearly_on_too_few_is_not_a_straggler():
    # rank 1 is slower on every row, by 25 % on 60 % of them and by 10 % on the rest: its
    # median is 25 % above rank 0's, but it is clearly (20 %) the slowest on 60 % of rows only
    factor = np.where(np.arange(N) % 5 < 3, 1.25, 1.10)
    df = _history([0.0, 0.0], [np.full(N, 0.010), 0.010 * factor], step_time=0.012)
    assert _straggler(df) == ([], [])
    df = _history([0.0, 0.0], [np.full(N, 0.010), np.full(N, 0.0125)], step_time=0.012)
    (f,), _ = _straggler(df)  # 25 % slower on every row: reported
    assert f.evidence["slowest_rank"] == 1 and f.evidence["cause"] == "compute"


def test_per_rank_times_win_over_the_step_time_gap():
    # step times say rank 0 is 40 % slower on every row (the all-reduce blur can make such
    # numbers); the ranks' own data + compute times are balanced: no straggler
    df = _history([1e-4, 1e-4], [0.002, 0.002], step_time=0.030, noise=0.02)
    df["dist/step_time_min"] = 0.6 * df["dist/step_time_max"]
    df["dist/slowest_rank"] = 0.0
    assert _straggler(df) == ([], [])
    (f,), _ = _straggler(df.drop(columns=[c for c in df.columns if "_time/" in c]))
    assert f.evidence["source"] == "per-rank step times"  # the fallback, for old histories


def test_too_few_rows_with_per_rank_times_is_a_skip_with_the_reason():
    df = _history([1e-4, 0.050], [0.002, 0.002], step_time=0.075, n=8)
    found, skipped = _straggler(df)
    assert found == []
    assert "per-rank data/compute times" in skipped[0]["reason"]


def test_rows_without_every_ranks_times_are_left_out():
    df = _history([1e-4, 0.050], [0.002, 0.002], step_time=0.075)
    df.loc[0, ["dist/data_time/0", "dist/data_time/1"]] = np.nan  # step 1 has no data time
    df.loc[df.index[-5:], "dist/compute_time/1"] = np.nan
    (f,), _ = _straggler(df)
    assert f.evidence["step_range"][1] == 10 * (N - 5)
