"""Rules on distributed runs: a straggler rank. Thresholds are named constants.

Two sources, best first:

1. Per-rank times (``dist/data_time/<r>``, ``dist/compute_time/<r>``, written by the Monitor
   under torchrun): each rank's own time waiting for its batch and running its forward. Under
   DDP the forward holds no collective, so these do not absorb the all-reduce wait; the
   straggler is named directly, with whether it is slow at data or at compute.
2. Otherwise (older histories) the gap between the slowest and fastest rank's step time
   (``dist/step_time_max`` / ``dist/step_time_min``), which the all-reduce wait blurs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import (
    DIST_MAX,
    DIST_MIN,
    DIST_SLOWEST,
    STEP_TIME,
    clamp01,
    r,
    require,
)
from tdiag.report.rules.registry import SkipRule, register_rule

MIN_POINTS = 10
WARMUP_SKIP = 0.1

# -- per-rank times ------------------------------------------------------------------------
# A rank whose median data+compute time is at least 20 % above the fastest rank's (judgement:
# a fifth of a rank's work is worth acting on; balanced 2-rank gloo runs with a ~10 ms forward
# differed by 0-4 % on a quiet 2-core machine and by up to 35 % on a loaded one, which the
# consistency test below keeps quiet) ...
RANK_EXCESS = 0.20
# ... by at least 5 % of the step (a floor: a 20 % gap on microseconds of data time costs
# nothing and is timer noise) ...
RANK_EXCESS_OF_STEP = 0.05
# ... and the slowest, by that same 20 %, on at least 75 % of the logged rows. Healthy ranks
# take turns (~1/world of the rows each), and a row's forward time is one sample that a busy
# host inflates now and then: on 2-rank gloo runs of a balanced loop on a loaded 2-core
# machine a rank was the plain slowest on up to 77 % of rows but clearly (20 %) slowest on at
# most 46 %; a rank with a slow loader was clearly slowest on 100 %.
RANK_SAME_SLOWEST = 0.75
_RANK_COL = re.compile(r"^dist/(data|compute)_time/(\d+)$")

# -- step-time gap (fallback) --------------------------------------------------------------
# Per-rank step times are wall times between steps, and in synchronous data parallelism they
# include the wait in the gradient all-reduce: the fast ranks' times absorb most of the
# straggler's delay, so the measured gap understates it (a rank sleeping 40 ms of a 70 ms
# step shows a ~10 % gap on a 2-rank gloo run; healthy ranks show 1-3 %). So: a median gap
# of at least 5 % ...
STRAGGLER_IMBALANCE = 0.05
# ...with the same rank the slowest on most logged steps (healthy ranks take turns, ~50 %).
STRAGGLER_SAME_RANK = 0.8
# Without dist/slowest_rank a gap alone must be larger to be trusted.
STRAGGLER_IMBALANCE_ALONE = 0.25

_RECOMMEND = {
    "data": (
        "Rank {rank} waits for its batches: give its DataLoader more workers (num_workers, "
        "pin_memory, prefetch_factor), move tokenisation/augmentation out of the main process, "
        "check that its shard is not on slower storage and is not made of longer sequences "
        "(bucket or pack by length). Every rank waits for it at each all-reduce."
    ),
    "compute": (
        "Rank {rank}'s forward is slower on its share of the work: check its device (another "
        "process on it, thermal or power throttling, a slower GPU or link), its inputs (longer "
        "sequences in its shard: bucket or pack by length) and rank-specific work inside the "
        "step (logging, evaluation or checkpointing on one rank). Every rank waits for it at "
        "each all-reduce."
    ),
}


@register_rule("dist.straggler", title="Straggler rank")
def straggler(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    times = _rank_times(df)
    if times is not None:
        return _from_rank_times(df, *times)
    return _from_step_times(df)


def _rank_times(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(data, compute): per-rank seconds per step, one column per rank (int), indexed by
    step, rows where every rank has both; None when the history has no per-rank times."""
    cols: dict[str, dict[int, str]] = {"data": {}, "compute": {}}
    for name in df.columns:
        m = _RANK_COL.match(str(name))
        if m:
            cols[m.group(1)][int(m.group(2))] = name
    ranks = sorted(set(cols["data"]) & set(cols["compute"]))
    if len(ranks) < 2:
        return None
    frames = [
        pd.DataFrame({rk: an.metric(df, cols[kind][rk]) for rk in ranks})
        for kind in ("data", "compute")
    ]
    both = pd.concat(frames, axis=1, keys=["data", "compute"], join="inner").dropna()
    return both["data"], both["compute"]


@dataclass(frozen=True)
class _Slow:
    """The slowest rank against the fastest, from per-rank medians over the steady part."""

    slow: int
    fast: int
    excess: float  # s per step, data + compute
    step_time: float  # median s per step
    share: float  # rows on which ``slow`` was clearly (RANK_EXCESS) the slowest
    data: pd.Series  # per-rank median data time, s
    compute: pd.Series  # per-rank median forward time, s
    span: list[int]

    @property
    def excess_data(self) -> float:
        return float(self.data[self.slow] - self.data[self.fast])

    @property
    def excess_compute(self) -> float:
        return float(self.compute[self.slow] - self.compute[self.fast])

    @property
    def cause(self) -> str:
        return "data" if self.excess_data >= self.excess_compute else "compute"


def _from_rank_times(df: pd.DataFrame, data: pd.DataFrame, compute: pd.DataFrame) -> list[Finding]:
    total = data + compute
    keep = an.steady_part(total.iloc[:, 0], WARMUP_SKIP).index
    total, data, compute = total.loc[keep], data.loc[keep], compute.loc[keep]
    if len(total) < MIN_POINTS:
        raise SkipRule(
            f"only {len(total)} logged steps with per-rank data/compute times, need {MIN_POINTS}"
        )
    med = total.median()
    slow, fast = int(med.idxmax()), int(med.idxmin())
    excess, base = float(med[slow] - med[fast]), float(med[fast])
    step_time = _median_step_time(df, total.index, fallback=float(med[slow]))
    clearly = (total.idxmax(axis=1) == slow) & (
        total[slow] >= (1 + RANK_EXCESS) * total.min(axis=1)
    )
    share = float(clearly.mean())
    if not (
        base > 0
        and excess >= RANK_EXCESS * base
        and excess >= RANK_EXCESS_OF_STEP * step_time
        and share >= RANK_SAME_SLOWEST
    ):
        return []
    span = [int(total.index[0]), int(total.index[-1])]
    found = _Slow(slow, fast, excess, step_time, share, data.median(), compute.median(), span)
    return [_rank_finding(found, base)]


def _rank_finding(x: _Slow, base: float) -> Finding:
    return Finding(
        id="dist.straggler",
        severity=Severity.WARNING,
        title=(
            f"Straggler: rank {x.slow} is slow at {x.cause}, +{x.excess * 1e3:.3g} ms a step "
            f"({x.excess / x.step_time:.0%})"
        ),
        message=_rank_message(x),
        step=x.span[0],
        evidence={
            "source": "per-rank data and compute times",
            "slowest_rank": x.slow,
            "fastest_rank": x.fast,
            "cause": x.cause,
            "data_time_s": {str(k): r(float(v)) for k, v in x.data.items()},
            "compute_time_s": {str(k): r(float(v)) for k, v in x.compute.items()},
            "excess_s": r(x.excess),
            "excess_frac": r(x.excess / base),
            "excess_of_step": r(x.excess / x.step_time),
            "excess_data_s": r(x.excess_data),
            "excess_compute_s": r(x.excess_compute),
            "median_step_time_s": r(x.step_time),
            "slowest_rank_share": r(x.share),
            "step_range": x.span,
            "impact": clamp01(x.excess / x.step_time),
        },
        recommendation=_RECOMMEND[x.cause].format(rank=x.slow),
    )


def _median_step_time(df: pd.DataFrame, steps: pd.Index, *, fallback: float) -> float:
    """Median step time over ``steps`` (``perf/step_time``, else the slowest rank's), or
    ``fallback`` (a step lasts at least the slowest rank's data + compute)."""
    for name in (STEP_TIME, DIST_MAX):
        s = an.metric(df, name)
        s = s[s.index.isin(steps)]
        if len(s):
            return max(float(s.median()), fallback)
    return fallback


def _rank_message(x: _Slow) -> str:
    ms = 1e3
    what = "waiting for its batches" if x.cause == "data" else "in its forward pass"
    d, c, slow, fast = x.data, x.compute, x.slow, x.fast
    return (
        f"Rank {slow} spent a median {x.excess * ms:.3g} ms more per step than rank {fast} "
        f"(the fastest), mostly {what}: data {d[slow] * ms:.3g} ms vs {d[fast] * ms:.3g} ms, "
        f"forward {c[slow] * ms:.3g} ms vs {c[fast] * ms:.3g} ms, of a "
        f"{x.step_time * ms:.3g} ms step. It was the slowest rank, by {RANK_EXCESS:.0%} or "
        f"more, on {x.share:.0%} of logged steps; the other ranks wait for it at every "
        "all-reduce."
    )


def _from_step_times(df: pd.DataFrame) -> list[Finding]:
    """The fallback for histories without per-rank data/compute times."""
    tmax = an.steady_part(require(df, DIST_MAX), WARMUP_SKIP)
    tmin = require(df, DIST_MIN)
    both = pd.concat([tmax, tmin], axis=1, join="inner").dropna()
    both = both[both.iloc[:, 0] > 0]
    if len(both) < MIN_POINTS:
        raise SkipRule(f"only {len(both)} logged steps with per-rank step times, need {MIN_POINTS}")
    imbalance = 1.0 - both.iloc[:, 1] / both.iloc[:, 0]
    med = float(imbalance.median())
    if med <= STRAGGLER_IMBALANCE:
        return []
    rank, share = None, None
    slow = an.metric(df, DIST_SLOWEST)
    slow = slow[slow.index.isin(both.index)]
    if len(slow):
        counts = slow.round().astype(int).value_counts()
        rank, share = int(counts.index[0]), float(counts.iloc[0] / len(slow))
        if share < STRAGGLER_SAME_RANK:
            return []
    elif med <= STRAGGLER_IMBALANCE_ALONE:
        return []
    return [_step_time_finding(both, med, rank, share)]


def _step_time_finding(
    both: pd.DataFrame, med: float, rank: int | None, share: float | None
) -> Finding:
    who = f"rank {rank}" if rank is not None else "one rank"
    t_max, t_min = float(both.iloc[:, 0].median()), float(both.iloc[:, 1].median())
    return Finding(
        id="dist.straggler",
        severity=Severity.WARNING,
        title=f"Straggler: {who} is {med:.0%} slower",
        message=(
            f"The slowest rank's step took a median {med:.0%} longer than the fastest's "
            f"({t_max * 1e3:.3g} ms vs {t_min * 1e3:.3g} ms)"
            + (
                f"; rank {rank} was the slowest on {share:.0%} of logged steps."
                if rank is not None and share is not None
                else "."
            )
        ),
        step=int(both.index[0]),
        evidence={
            "source": "per-rank step times",
            "median_imbalance": r(med),
            "median_step_time_max_s": r(t_max),
            "median_step_time_min_s": r(t_min),
            "slowest_rank": rank,
            "slowest_rank_share": r(share) if share is not None else None,
            "step_range": [int(both.index[0]), int(both.index[-1])],
            "note": "per-rank times include all-reduce waits: the gap understates the delay",
            "impact": clamp01(med),
        },
        recommendation=(
            "Every rank waits for the slowest at each all-reduce. Check that rank's host/GPU "
            "(other processes, thermal throttling, a slower device or link), its data shard "
            "(longer sequences, slow storage, fewer loader workers) and uneven work "
            "(rank-0-only logging or evaluation inside the step). With a Monitor that logs "
            "dist/data_time/<r> and dist/compute_time/<r>, the report names the rank and "
            "whether it is slow at data or compute."
        ),
    )
