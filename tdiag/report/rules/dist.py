"""Rules on distributed runs: a straggler rank. Thresholds are named constants."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import DIST_MAX, DIST_MIN, DIST_SLOWEST, clamp01, r, require
from tdiag.report.rules.registry import SkipRule, register_rule

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
MIN_POINTS = 10
WARMUP_SKIP = 0.1


@register_rule("dist.straggler", title="Straggler rank")
def straggler(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
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
    who = f"rank {rank}" if rank is not None else "one rank"
    return [
        Finding(
            id="dist.straggler",
            severity=Severity.WARNING,
            title=f"Straggler: {who} is {med:.0%} slower",
            message=(
                f"The slowest rank's step took a median {med:.0%} longer than the fastest's "
                f"({both.iloc[:, 0].median() * 1e3:.3g} ms vs {both.iloc[:, 1].median() * 1e3:.3g} ms)"
                + (
                    f"; rank {rank} was the slowest on {share:.0%} of logged steps."
                    if rank is not None
                    else "."
                )
            ),
            step=int(both.index[0]),
            evidence={
                "median_imbalance": r(med),
                "median_step_time_max_s": r(float(both.iloc[:, 0].median())),
                "median_step_time_min_s": r(float(both.iloc[:, 1].median())),
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
                "(rank-0-only logging or evaluation inside the step)."
            ),
        )
    ]
