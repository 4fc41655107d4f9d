"""Helpers shared by the rule families: metric names, meta look-ups, skip reasons."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import pandas as pd

from tdiag.report import analyses as an
from tdiag.report.rules.registry import SkipRule

# Contract 3 metric names.
LOSS = "train/loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
CLIP_FRAC = "train/grad_clip_frac"
UPDATE_RATIO = "train/update_ratio"
SKIPPED = "train/skipped_steps"
VAL_LOSS = "val/loss"
STEP_TIME = "perf/step_time"
TOKENS_PER_SEC = "perf/tokens_per_sec"
MFU = "perf/mfu"
DATA_TIME = "perf/data_time"
GPU_ALLOC = "sys/gpu_mem_allocated_gb"
GPU_RESERVED = "sys/gpu_mem_reserved_gb"
GPU_PEAK = "sys/gpu_mem_peak_gb"
GPU_TOTAL = "sys/gpu_mem_total_gb"
GPU_UTIL = "sys/gpu_util"
RSS = "sys/rss_gb"
DIST_MAX = "dist/step_time_max"
DIST_MIN = "dist/step_time_min"
DIST_SLOWEST = "dist/slowest_rank"

T = TypeVar("T")

# Several rules need the same smoothed loss or spike list. ``evaluate`` opens a memo scope
# for the duration of one call, so each is computed once per history; outside a scope
# (a rule called directly, in a test) nothing is cached.
_MEMO: ContextVar[dict[tuple[int, str], Any] | None] = ContextVar("tdiag_rules_memo", default=None)


@contextmanager
def memo_scope() -> Iterator[None]:
    """Cache :func:`memo` results until the block ends."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def memo(df: pd.DataFrame, key: str, fn: Callable[[], T]) -> T:
    """``fn()``, computed once per (history, key) inside a :func:`memo_scope`."""
    cache = _MEMO.get()
    if cache is None:
        return fn()
    k = (id(df), key)
    if k not in cache:
        cache[k] = fn()
    return cache[k]


# Metrics the Monitor writes on the same row as the training loss: a NaN loss on a row
# that carries one of these was logged as NaN (not merely absent).
LOSS_COMPANIONS = (LR, STEP_TIME, TOKENS_PER_SEC, CLIP_FRAC, UPDATE_RATIO, DATA_TIME)


def loss_nonfinite_steps(df: pd.DataFrame) -> pd.Index:
    """Steps with a logged non-finite training loss (memoised within ``evaluate``)."""
    return memo(df, "loss_nonfinite", lambda: an.nonfinite_steps(df, LOSS, LOSS_COMPANIONS))


def require(df: pd.DataFrame, name: str, *, min_points: int = 1) -> pd.Series:
    """The finite series of ``name``; raises SkipRule when it has fewer than ``min_points``."""
    s = an.metric(df, name)
    if len(s) == 0:
        raise SkipRule(f"no {name} in history")
    if len(s) < min_points:
        raise SkipRule(f"only {len(s)} {name} point(s), need {min_points}")
    return s


def meta_get(meta: Mapping[str, Any] | None, *paths: str) -> Any:
    """The first value found at one of the dotted ``paths`` in ``meta`` (None if none)."""
    for path in paths:
        node: Any = meta or {}
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def meta_float(meta: Mapping[str, Any] | None, *paths: str) -> float | None:
    """Like :func:`meta_get`, as a finite float (None when absent or not a number)."""
    value = meta_get(meta, *paths)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def device_kind(meta: Mapping[str, Any] | None) -> str | None:
    """ "cuda", "cpu", "mps"… from meta.environment.device / meta.config.device, else None."""
    dev = meta_get(meta, "environment.device", "config.device", "device")
    if not isinstance(dev, str) or not dev:
        return None
    return dev.split(":", 1)[0].lower()


def value_at(s: pd.Series, step: int) -> float:
    """The value of ``s`` at ``step`` or the last one before it (NaN when none)."""
    if len(s) == 0:
        return math.nan
    pos = int(s.index.searchsorted(step, side="right")) - 1
    return float(s.iloc[max(pos, 0)])


def clamp01(x: float) -> float:
    """``x`` clipped to [0, 1] (NaN -> 0): an impact score."""
    if not math.isfinite(x):
        return 0.0
    return float(min(1.0, max(0.0, x)))


def steps_list(steps: Iterable[Any], limit: int = 20) -> list[int]:
    """At most ``limit`` steps as plain ints (evidence stays small in report.json)."""
    out = []
    for s in steps:
        out.append(int(s))
        if len(out) >= limit:
            break
    return out


def r(x: float, digits: int = 4) -> float:
    """Round for evidence: significant digits, keeping non-finite as is."""
    if not math.isfinite(x) or x == 0:
        return float(x)
    return float(f"{x:.{digits}g}")
