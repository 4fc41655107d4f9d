"""The report's analyses against naive references computed point by point."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tdiag.report import analyses as an


def _series(values, steps=None) -> pd.Series:
    values = np.asarray(values, dtype=float)
    steps = np.arange(len(values)) * 10 if steps is None else np.asarray(steps)
    return pd.Series(values, index=pd.Index(steps, name="step"))


@pytest.fixture
def noisy() -> pd.Series:
    rng = np.random.default_rng(1)
    return _series(3.0 + rng.normal(0, 0.2, 120))


def test_metric_drops_missing_sorts_and_keeps_last_duplicate():
    df = pd.DataFrame(
        {
            "step": [0, 10, 10, 30, 20, 40],
            "train/loss": [1.0, 2.0, 2.5, np.inf, np.nan, 0.5],
        }
    )
    s = an.metric(df, "train/loss")
    assert list(s.index) == [0, 10, 40]
    assert list(s) == [1.0, 2.5, 0.5]
    s_inf = an.metric(df, "train/loss", finite=False)
    assert list(s_inf.index) == [0, 10, 30, 40]
    assert an.metric(df, "absent").empty
    assert an.has_metric(df, "train/loss", min_points=3)
    assert not an.has_metric(df, "train/loss", min_points=5)  # 4 finite cells


def test_nonfinite_steps_tells_logged_nan_from_missing():
    df = pd.DataFrame(
        {
            "step": [0, 10, 20, 20, 30, 40],
            "train/loss": [2.0, np.nan, 1.0, np.nan, -np.inf, np.nan],
            "train/lr": [1e-3, 1e-3, 1e-3, np.nan, 1e-3, np.nan],
            "val/loss": [np.nan, np.nan, np.nan, 1.5, np.nan, np.nan],
        }
    )
    # step 10: NaN with its LR beside it (logged); second step-20 row: a val-only row
    # (missing); 30: -inf; 40: a row of NaNs only: with the LR logged elsewhere it may be a
    # NaN validation row, so it is not taken for a NaN training loss (no false error)...
    assert list(an.nonfinite_steps(df, "train/loss", ("train/lr",))) == [10, 30]
    # ...but in a history that logs no companion, a row of nothing else is the loss's own.
    alone = df.drop(columns=["train/lr", "val/loss"])
    assert list(an.nonfinite_steps(alone, "train/loss", ("train/lr",))) == [10, 20, 30, 40]
    assert an.first_nonfinite_step(df, "train/loss", ("train/lr",)) == 10
    assert an.first_nonfinite_step(df.iloc[[0, 2, 3]], "train/loss", ("train/lr",)) is None


def test_rolling_median_matches_naive(noisy):
    w = 7
    got = an.rolling_median(noisy, w).to_numpy()
    x = noisy.to_numpy()
    ref = [np.median(x[max(0, i - w + 1) : i + 1]) for i in range(len(x))]
    np.testing.assert_allclose(got, ref)
    got_c = an.rolling_median(noisy, w, center=True).to_numpy()
    ref_c = [np.median(x[max(0, i - 3) : i + 4]) for i in range(len(x))]
    np.testing.assert_allclose(got_c, ref_c)


def test_rolling_mad_matches_its_definition(noisy):
    w = 9
    x = noisy.to_numpy()
    med = [np.median(x[max(0, i - w + 1) : i + 1]) for i in range(len(x))]
    dev = np.abs(x - np.array(med))
    ref = [np.median(dev[max(0, i - w + 1) : i + 1]) for i in range(len(x))]
    np.testing.assert_allclose(an.rolling_mad(noisy, w).to_numpy(), ref)


def test_ema_matches_recursion(noisy):
    alpha = 0.3
    x = noisy.to_numpy()
    ref = [x[0]]
    for v in x[1:]:
        ref.append(alpha * v + (1 - alpha) * ref[-1])
    np.testing.assert_allclose(an.ema(noisy, alpha=alpha).to_numpy(), ref)
    with pytest.raises(ValueError, match="exactly one"):
        an.ema(noisy)


def test_robust_smooth_ignores_an_isolated_spike(noisy):
    spiked = noisy.copy()
    spiked.iloc[60] = 50.0
    sm = an.robust_smooth(spiked, 9)
    assert sm.max() < 4.0  # the median filter removed it
    assert abs(float(sm.median()) - 3.0) < 0.1


def test_spikes_match_naive_detector():
    rng = np.random.default_rng(2)
    x = 2.0 + rng.normal(0, 0.05, 200)
    x[[50, 120, 121, 180]] += [3.0, 1.5, 2.0, 0.05]  # the last is within noise
    s = _series(x)
    w, z, rel = 15, 6.0, 0.25
    got = an.spikes(s, window=w, z=z, rel=rel, min_history=5)
    ref = []
    for i in range(1, len(x)):
        prev = x[max(0, i - w) : i]  # the w points before i
        diffs = np.abs(np.diff(x[max(0, i - w - 1) : i]))[-w:]  # |dx| of those points
        if len(prev) < 5 or len(diffs) < 4:
            continue
        base = np.median(prev)
        sigma = max(np.median(diffs) * an.MAD_TO_SIGMA / math.sqrt(2), 1e-12 + 1e-9 * abs(base))
        if (x[i] - base) / sigma > z and x[i] - base > rel * abs(base):
            ref.append(i * 10)
    assert list(got.index) == ref
    assert {500, 1200} <= set(ref) and 1800 not in ref
    assert (got["ratio"] > 1.25).all()


def test_spikes_found_while_the_loss_still_falls_fast():
    # early training: a trailing median lags far above the curve; the noise scale must not
    # be inflated by the trend, or a real spike goes unseen
    rng = np.random.default_rng(7)
    steps = np.arange(0, 600, 5)
    x = 2.5 + 3.0 * np.exp(-steps / 60.0) + rng.normal(0, 0.05, len(steps))
    x[14] += 2.0  # step 70, while the loss is still dropping
    got = an.spikes(_series(x, steps))
    assert list(got.index) == [70]


def test_spikes_none_on_a_smooth_decreasing_curve():
    steps = np.arange(300)
    s = _series(2.0 + 3.0 * np.exp(-steps / 60.0), steps)
    assert an.spikes(s).empty


def test_linear_fit_matches_polyfit(noisy):
    x = noisy.index.to_numpy(dtype=float)
    y = 0.01 * x + noisy.to_numpy()
    fit = an.linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.slope == pytest.approx(slope)
    assert fit.intercept == pytest.approx(intercept)
    pred = slope * x + intercept
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2)
    assert math.isnan(an.linear_fit([1.0], [2.0]).slope)
    assert math.isnan(an.linear_fit([1.0, 1.0], [2.0, 3.0]).slope)


def test_log_linear_fit_recovers_growth_rate():
    steps = np.arange(0, 1000, 10)
    s = _series(0.5 * np.exp(0.002 * steps), steps)
    fit = an.log_linear_fit(s)
    assert fit.slope == pytest.approx(0.002)
    assert fit.r2 == pytest.approx(1.0)


def test_rolling_linear_slope_matches_windowed_polyfit(noisy):
    w = 11
    got = an.rolling_linear_slope(noisy, w)
    x = noisy.index.to_numpy(dtype=float)
    y = noisy.to_numpy()
    for i in (10, 50, 119):
        ref = np.polyfit(x[i - w + 1 : i + 1], y[i - w + 1 : i + 1], 1)[0]
        assert got.iloc[i] == pytest.approx(ref, rel=1e-6)
    pos = _series(np.exp(0.01 * np.arange(50) * 10))
    assert an.rolling_linear_slope(pos, 5, log=True).iloc[-1] == pytest.approx(0.01)


def test_best_split_matches_brute_force():
    rng = np.random.default_rng(3)
    y = np.concatenate([rng.normal(0, 1, 40), rng.normal(3, 1, 25)])
    k, gain = an._best_split(y, 3)
    sse = lambda a: ((a - a.mean()) ** 2).sum()  # noqa: E731
    gains = {j: sse(y) - sse(y[:j]) - sse(y[j:]) for j in range(3, len(y) - 2)}
    best = max(gains, key=gains.get)
    assert k == best
    assert gain == pytest.approx(gains[best])


def test_change_points_find_planted_shifts_and_none_in_noise():
    rng = np.random.default_rng(4)
    y = np.concatenate([rng.normal(10, 0.3, 100), rng.normal(6, 0.3, 80), rng.normal(8, 0.3, 70)])
    cps = an.change_points(_series(y))
    assert [c.step for c in cps] == [1000, 1800]
    assert cps[0].before == pytest.approx(10, abs=0.2) and cps[0].after == pytest.approx(6, abs=0.2)
    assert an.change_points(_series(rng.normal(5, 1, 300))) == []


def test_plateau_start_matches_naive():
    steps = np.arange(100)
    y = np.where(steps < 40, 5.0 - 0.05 * steps, 3.0)
    s = _series(y, steps)
    got = an.plateau_start(s, rel_tol=0.01, smooth=False)
    # naive: the first i from which no later point beats any point by more than 1 %
    ref = next(
        i
        for i in range(len(y) - 1)
        if all(y[k] - y[k + 1 :].min() <= 0.01 * abs(y[k]) for k in range(i, len(y) - 1))
    )
    assert got == ref == 40
    # a curve improving to the end "plateaus" only over its last 1 % of improvement
    improving = _series(5.0 - 0.01 * steps, steps)
    assert an.plateau_start(improving, smooth=False) >= 95
    assert an.plateau_start(_series([3.0, 2.0, 1.0]), smooth=False) is None


def test_sustained_from():
    mask = pd.Series([True, False, True, True, True], index=[0, 10, 20, 30, 40])
    assert an.sustained_from(mask) == 20
    assert an.sustained_from(mask.iloc[:2]) is None
    assert an.sustained_from(pd.Series([True, True], index=[5, 6])) == 5


def test_steady_part_and_relative_change():
    s = _series(np.arange(100, dtype=float), np.arange(100))
    assert an.steady_part(s, 0.1).index[0] == 10
    assert len(an.steady_part(s.iloc[:2], 0.5)) == 2  # too short to cut
    assert an.relative_change(s, 10, 20) == pytest.approx(1.0)


def test_correlation_spearman_matches_ranks():
    rng = np.random.default_rng(5)
    a = _series(rng.normal(size=50))
    b = _series(np.exp(a.to_numpy()) + rng.normal(0, 0.01, 50))
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    ref = np.corrcoef(rank(a.to_numpy()), rank(b.to_numpy()))[0, 1]
    assert an.correlation(a, b) == pytest.approx(ref)
    assert an.correlation(a, b.iloc[:2]) != an.correlation(a, b.iloc[:2])  # NaN


def test_scales_linearly_on_a_long_history():
    # A smoke bound, not a benchmark (bench/ measures): 200k points through the heavy paths.
    n = 200_000
    s = _series(np.random.default_rng(6).normal(2, 0.1, n), np.arange(n))
    import time

    t0 = time.process_time()
    an.robust_smooth(s)
    an.spikes(s)
    an.change_points(s)
    an.rolling_linear_slope(s, 101)
    assert time.process_time() - t0 < 10.0
