"""``data.unshuffled`` and ``data.label-leak`` on real runs (tests/report/fixtures, made by
make_fixtures.py: ``data_unshuffled`` / ``data_shuffled``, ``label_leak``, ``overfit_tiny``,
``loop_repeated_batch``), on variants of those histories (another log interval, no meta, no
validation loss), and the periodicity statistic against a naive reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tdiag.findings import Severity
from tdiag.history import read_events, read_history
from tdiag.report import analyses as an
from tdiag.report.rules import evaluate
from tdiag.report.rules._period import PERIOD_ACF, lag_correlation, moving_average

FIXTURES = Path(__file__).parent / "fixtures"
ALL = sorted(f.name for f in FIXTURES.iterdir() if (f / "history.jsonl").exists())


def load(name: str) -> tuple[pd.DataFrame, dict, list]:
    folder = FIXTURES / name
    df, _ = read_history(folder)
    return df, json.loads((folder / "meta.json").read_text()), read_events(folder)


def run(df: pd.DataFrame, meta: dict, rule: str, events=()):
    res = evaluate(df, meta, events, only=[rule])
    return [f for f in res.findings if f.id == rule], res.skipped


def every(df: pd.DataFrame, g: int) -> pd.DataFrame:
    """The training loss as a Monitor logging every ``g`` x the interval would have written it
    (the mean of each ``g`` consecutive rows, at the last one's step)."""
    loss = an.metric(df, "train/loss").iloc[1:]  # the Monitor's extra row at step 1
    n = len(loss) // g * g
    steps = loss.index.to_numpy()[g - 1 : n : g]
    return pd.DataFrame({"step": steps, "train/loss": loss.to_numpy()[:n].reshape(-1, g).mean(1)})


# ------------------------------------------------------------------------ data.unshuffled
@pytest.mark.parametrize("name", [n for n in ALL if n != "data_unshuffled"])
def test_no_other_fixture_reads_as_unshuffled(name):
    found, _ = run(*load(name)[:2], "data.unshuffled")
    assert [f.message for f in found] == []


def test_unshuffled_period_is_the_epoch():
    df, meta, _ = load("data_unshuffled")
    (f,) = run(df, meta, "data.unshuffled")[0]
    ev = f.evidence
    assert meta["config"]["steps_per_epoch"] == 40 and meta["config"]["shuffle"] is False
    assert ev["period_steps"] == 40 and ev["period_rows"] == 20 and ev["log_interval_steps"] == 2
    assert ev["matches_config_epoch"] is True and ev["steps_per_epoch_config"] == 40
    assert ev["autocorrelation"] > 0.9 and ev["periods_seen"] > 7
    assert ev["pattern_amplitude"] > 0.1  # nats: each batch's offset, well above noise
    assert f.step == 41 and ev["steps"][:3] == [41, 81, 121]  # the first repeats
    assert "shuffle=True" in f.recommendation and "set_epoch" in f.recommendation
    # without the config the search finds the same lag
    (bare,) = run(df, {}, "data.unshuffled")[0]
    assert bare.evidence["period_steps"] == 40 and bare.evidence["matches_config_epoch"] is None


@pytest.mark.parametrize("g", [1, 2, 5])
def test_unshuffled_seen_at_other_log_intervals(g):
    # logged every 2, 4 or 10 steps: 20, 10 or 4 rows per epoch
    df, meta, _ = load("data_unshuffled")
    (f,) = run(every(df, g), meta, "data.unshuffled")[0]
    assert f.evidence["period_steps"] == 40 and f.evidence["log_interval_steps"] == 2 * g
    shuffled, meta_s, _ = load("data_shuffled")
    assert run(every(shuffled, g), meta_s, "data.unshuffled")[0] == []


def test_unshuffled_needs_three_periods():
    df, meta, _ = load("data_unshuffled")
    assert run(df[df["step"] <= 130], meta, "data.unshuffled")[0]  # 3.2 epochs
    assert run(df[df["step"] <= 100], {}, "data.unshuffled")[0] == []  # 2.5 epochs


def test_shuffled_run_is_far_below_the_bar():
    df, _, _ = load("data_shuffled")
    x = an.metric(df, "train/loss").to_numpy()
    best = max(lag_correlation(x, lag)[0] for lag in range(2, len(x) // 3 + 1))
    assert best < PERIOD_ACF - 0.2
    assert lag_correlation(x, 20)[0] < 0.2  # at the epoch itself: nothing


def test_a_cyclic_lr_is_not_read_as_data_order():
    # SGDR-like restarts every 50 steps: the loss repeats because the LR does
    steps = np.arange(1, 601)
    rng = np.random.default_rng(0)
    phase = (steps - 1) % 50
    lr = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * phase / 50))
    loss = 2 + 2 * np.exp(-steps / 200) + 300 * lr + rng.normal(0, 0.02, len(steps))
    df = pd.DataFrame({"step": steps, "train/loss": loss, "train/lr": lr})
    assert run(df, {}, "data.unshuffled")[0] == []
    (f,) = run(df.drop(columns="train/lr"), {}, "data.unshuffled")[0]  # control
    assert f.evidence["period_steps"] == 50


def test_irregular_logging_is_skipped():
    df = pd.DataFrame({"step": np.cumsum(np.arange(1, 41)), "train/loss": np.linspace(4, 2, 40)})
    found, skipped = run(df, {}, "data.unshuffled")
    assert found == [] and "regular interval" in skipped[0]["reason"]


def test_moving_average_and_lag_correlation_against_naive():
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.normal(0, 1, 97)) * 0.1 + np.tile(rng.normal(0, 1, 7), 14)[:97]
    for lag in (2, 3, 6, 7, 10):
        ma, off = moving_average(x, lag)
        if lag % 2:
            naive = np.array([x[i - off : i + off + 1].mean() for i in range(off, len(x) - off)])
        else:
            w = np.r_[0.5, np.ones(lag - 1), 0.5] / lag
            naive = np.array(
                [(x[i - off : i + off + 1] * w).sum() for i in range(off, len(x) - off)]
            )
        np.testing.assert_allclose(ma, naive, rtol=1e-12, atol=1e-12)
        acf, pairs, res = lag_correlation(x, lag)
        np.testing.assert_allclose(res, x[off : off + len(naive)] - naive, atol=1e-12)
        med = np.median(res)
        mad = 1.4826 * np.median(np.abs(res - med))
        pairs_naive = [
            (res[i], res[i + lag])
            for i in range(len(res) - lag)
            if abs(res[i] - med) <= 3.5 * mad and abs(res[i + lag] - med) <= 3.5 * mad
        ]
        a, b = np.array(pairs_naive).T
        assert pairs == len(pairs_naive)
        assert acf == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert lag_correlation(x, 7)[0] > 0.8  # the planted period


# ------------------------------------------------------------------------ data.label-leak
def test_label_leak_is_confirmed_by_the_validation_loss():
    df, meta, _ = load("label_leak")
    (f,) = run(df, meta, "data.label-leak")[0]
    ev = f.evidence
    assert f.severity is Severity.ERROR and 60 <= f.step <= 90
    assert ev["steps_to_near_zero"] == f.step and ev["loss"] <= ev["threshold"]
    assert ev["ln_vocab"] == pytest.approx(math.log(257), rel=1e-3) and ev["vocab_size"] == 257
    assert ev["threshold"] == pytest.approx(max(0.05, 0.01 * math.log(257)), rel=1e-3)
    assert ev["val_loss_after"] < 0.1 and ev["val_points_after"] >= 3
    assert any("validation" in s for s in ev["signs"])
    assert "shift" in f.recommendation


def test_label_leak_without_val_or_epoch_falls_back_on_speed():
    df, meta, _ = load("label_leak")
    no_val = df.drop(columns="val/loss")
    (f,) = run(no_val, meta, "data.label-leak")[0]  # the config's epoch: 1367 steps
    assert f.severity is Severity.ERROR and any("first epoch" in s for s in f.evidence["signs"])
    (f,) = run(no_val, {}, "data.label-leak")[0]  # nothing but the speed
    assert f.severity is Severity.WARNING and f.evidence["ln_vocab"] is None
    assert f.evidence["threshold"] == 0.05


def test_honest_overfit_of_a_tiny_corpus_is_not_a_leak():
    df, meta, _ = load("overfit_tiny")
    sm = an.robust_smooth(an.metric(df, "train/loss"))
    reached = int(sm[sm <= 0.0555].index[0])
    assert reached > 200  # it does get near 0, slowly: 2 batches seen 100+ times each
    assert run(df, meta, "data.label-leak")[0] == []  # val high: memorised
    assert run(df.drop(columns="val/loss"), meta, "data.label-leak")[0] == []  # slow
    assert run(df.drop(columns="val/loss"), {}, "data.label-leak")[0] == []


def test_one_batch_memorised_is_flagged_but_not_confirmed():
    df, meta, _ = load("loop_repeated_batch")
    (f,) = run(df, meta, "data.label-leak")[0]
    assert f.severity is Severity.WARNING  # val stayed high: not confirmed
    assert f.evidence["val_loss_after"] > 5 and "data.repeated-batch" in f.message
    assert not any("first epoch" in s for s in f.evidence["signs"])  # val says data repeated


def test_a_loss_that_touches_the_bar_once_is_not_a_leak():
    steps = np.arange(1, 101)
    loss = np.full(100, 2.0)
    loss[40:45] = 0.01  # a glitch, not a level
    df = pd.DataFrame({"step": steps, "train/loss": loss})
    assert run(df, {}, "data.label-leak")[0] == []
