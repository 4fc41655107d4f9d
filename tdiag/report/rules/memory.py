"""Rules on memory: GPU memory near capacity, memory that keeps growing (a leak).
Thresholds are named constants; each says why it has its value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import (
    GPU_ALLOC,
    GPU_PEAK,
    GPU_RESERVED,
    GPU_TOTAL,
    RSS,
    clamp01,
    meta_float,
    r,
)
from tdiag.report.rules.registry import SkipRule, register_rule

# Peak GPU memory above 90 % of the device: the next longer batch or a fragmentation
# hiccup is an OOM. Judgement (PyTorch's allocator itself keeps some slack).
NEAR_CAPACITY_FRAC = 0.9
# A leak: after the first LEAK_SKIP of the run, memory rises on a straight line (R^2) by
# at least LEAK_MIN_GB and LEAK_MIN_REL of its level. Allocators and caches grow in the first
# steps and then plateau; a leak keeps going. The absolute floor ignores allocator noise.
LEAK_SKIP = 0.2
LEAK_MIN_GB = 0.05
LEAK_MIN_REL = 0.1
LEAK_R2 = 0.8
LEAK_MIN_POINTS = 10


def gpu_capacity(df: pd.DataFrame, meta: Mapping[str, Any] | None) -> tuple[float, str] | None:
    """GPU memory capacity in GB: meta.environment.gpu_mem_total_gb first (what the Monitor
    records once), else the largest value of a sys/gpu_mem_total_gb column."""
    cap = meta_float(
        meta, "environment.gpu_mem_total_gb", "environment.gpu.mem_total_gb", "gpu_mem_total_gb"
    )
    if cap:
        return cap, "meta.environment.gpu_mem_total_gb"
    col = an.metric(df, GPU_TOTAL)
    if len(col) and col.max() > 0:
        return float(col.max()), GPU_TOTAL
    return None


@register_rule("mem.near-capacity", title="GPU memory near capacity")
def near_capacity(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    used_name = next((n for n in (GPU_PEAK, GPU_RESERVED, GPU_ALLOC) if an.has_metric(df, n)), None)
    if used_name is None:
        raise SkipRule("no GPU memory metric in history")
    cap = gpu_capacity(df, meta)
    if cap is None:
        raise SkipRule(
            f"GPU memory capacity unknown (no meta environment.gpu_mem_total_gb or {GPU_TOTAL})"
        )
    total, cap_source = cap
    used = an.metric(df, used_name)
    peak = float(used.max())
    frac = peak / total
    if frac < NEAR_CAPACITY_FRAC:
        return []
    step = int(used.idxmax())
    return [
        Finding(
            id="mem.near-capacity",
            severity=Severity.WARNING,
            title=f"GPU memory at {frac:.0%} of capacity",
            message=f"{used_name} peaked at {peak:.3g} GB of {total:.3g} GB ({frac:.0%}) at step {step}.",
            step=step,
            evidence={
                "metric": used_name,
                "peak_gb": r(peak),
                "capacity_gb": r(total),
                "capacity_source": cap_source,
                "frac": r(frac),
                "impact": clamp01((frac - NEAR_CAPACITY_FRAC) / (1 - NEAR_CAPACITY_FRAC)),
            },
            recommendation=(
                "Leave headroom: activation checkpointing, a smaller micro-batch with gradient "
                "accumulation, bf16, a fused/flash attention kernel, or sharding optimizer state "
                "(FSDP/ZeRO); set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation."
            ),
        )
    ]


@register_rule("mem.leak", title="Memory growing steadily")
def leak(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    candidates = [n for n in (GPU_ALLOC, RSS) if an.has_metric(df, n, min_points=LEAK_MIN_POINTS)]
    if not candidates:
        raise SkipRule(f"fewer than {LEAK_MIN_POINTS} points of {GPU_ALLOC} or {RSS}")
    out = []
    for name in candidates:  # at most two metrics
        s = an.steady_part(an.metric(df, name), LEAK_SKIP)
        if len(s) < LEAK_MIN_POINTS:
            continue
        fit = an.linear_fit(s.index.to_numpy(dtype=float), s.to_numpy())
        span = float(s.index[-1] - s.index[0])
        growth = fit.slope * span
        level = float(s.iloc[0])
        if not (growth >= max(LEAK_MIN_GB, LEAK_MIN_REL * level) and fit.r2 >= LEAK_R2):
            continue
        per_1k = fit.slope * 1000
        out.append(
            Finding(
                id="mem.leak",
                severity=Severity.WARNING,
                title=f"{name} grows {per_1k:.3g} GB per 1000 steps",
                where=None,
                message=(
                    f"{name} rose from {level:.3g} GB to {s.iloc[-1]:.3g} GB between steps "
                    f"{int(s.index[0])} and {int(s.index[-1])} on a straight line (R^2 {fit.r2:.2f}): "
                    "something is kept alive every step."
                ),
                step=int(s.index[0]),
                evidence={
                    "metric": name,
                    "start_gb": r(level),
                    "end_gb": r(float(s.iloc[-1])),
                    "growth_gb": r(growth),
                    "gb_per_1k_steps": r(per_1k),
                    "r2": r(fit.r2),
                    "step_range": [int(s.index[0]), int(s.index[-1])],
                    "impact": clamp01(growth / max(level, 1e-9)),
                },
                recommendation=(
                    "Look for tensors kept across steps: `losses.append(loss)` or `total += loss` "
                    "without `.item()`/`.detach()` (keeps each step's graph alive), outputs stored for "
                    "metrics, caches keyed by step, or hooks that store activations. Log "
                    "`loss.detach()` and accumulate Python floats on log steps only."
                ),
            )
        )
    return out
