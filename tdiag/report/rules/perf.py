"""Rules on speed: idle GPU, data-loading stalls, throughput degradation, low MFU.
Thresholds are named constants; each says why it has its value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import (
    DATA_TIME,
    GPU_UTIL,
    MFU,
    STEP_TIME,
    TOKENS_PER_SEC,
    clamp01,
    device_kind,
    r,
    require,
)
from tdiag.report.rules._slow import SlowStretch, moved_with, slow_stretches
from tdiag.report.rules.registry import SkipRule, register_rule

CPU_PERCENT = "sys/cpu_percent"  # Contract 3 (not in _common: only this family reads it)

# The first 10 % of a run (compilation, cudnn autotuning, caches filling) is not judged.
WARMUP_SKIP = 0.1
# Median GPU utilisation (NVML, percent of time a kernel ran) below this is a GPU waiting
# for the host; well-fed training sits above 90 %. Judgement.
GPU_UTIL_WARN = 50.0
# Data loading takes more than this share of the step time: the loader is on the critical
# path (with prefetching it should be ~0). Judgement.
DATA_STALL_FRAC = 0.2
# Throughput in the last quarter of the run below the first quarter (after warm-up), on a
# monotone downward trend (Spearman rho of throughput vs step). Shared machines move
# quarter medians by up to ~35 % when other jobs come and go (measured on the 2-core CI
# box), so a drop is a warning only from 50 % (2x slower); 30-50 % is an info.
THROUGHPUT_DROP_WARN = 0.5
THROUGHPUT_DROP_INFO = 0.3
THROUGHPUT_TREND_RHO = -0.6
THROUGHPUT_MIN_POINTS = 20
# A slow stretch anywhere in the run (tdiag.report.rules._slow): the rolling median below
# half the run's sustained peak (2x slower: beyond the ~35 % that other jobs move medians
# on a shared box), for at least 5 points and 2 % of the judged points, its median 4
# standard errors below the peak (a short dip of a noisy run is not one).
SLOW_FRAC = 0.5
SLOW_MIN_POINTS = 5
SLOW_MIN_SHARE = 0.02
SLOW_Z = 4.0
SLOW_MAX_FINDINGS = 3
# A companion metric "moved" when its median in the stretch is 25 % off the rest of the run.
MOVED_LOG_RATIO = math.log(1.25)
# MFU (fraction of the accelerator's peak FLOP/s). Well-tuned GPU training reaches 0.3-0.5;
# below 0.15 is usually fixable (bf16, bigger batches, fused kernels, torch.compile).
MFU_WARN = 0.15
MFU_INFO = 0.3


def _steady(df: pd.DataFrame, name: str, min_points: int = 5) -> pd.Series:
    return an.steady_part(require(df, name, min_points=min_points), WARMUP_SKIP)


@register_rule("perf.gpu-underutilized", title="GPU underutilized")
def gpu_underutilized(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    util = _steady(df, GPU_UTIL)
    if float(util.max()) <= 1.0:  # a fraction, not percent
        util = util * 100.0
    med = float(util.median())
    if med >= GPU_UTIL_WARN:
        return []
    low_frac = float((util < GPU_UTIL_WARN).mean())
    evidence = {
        "median_gpu_util_pct": r(med),
        "p90_gpu_util_pct": r(float(np.quantile(util.to_numpy(), 0.9))),
        "low_frac": r(low_frac),
        "step_range": [int(util.index[0]), int(util.index[-1])],
        "impact": clamp01(1.0 - med / 100.0),
    }
    dt = an.metric(df, DATA_TIME)
    st = an.metric(df, STEP_TIME)
    if len(dt) and len(st) and st.median() > 0:
        evidence["data_time_frac"] = r(float(dt.median() / st.median()))
    return [
        Finding(
            id="perf.gpu-underutilized",
            severity=Severity.WARNING,
            title=f"GPU busy only {med:.0f}% of the time",
            message=(
                f"Median GPU utilisation was {med:.0f}% after warm-up ({low_frac:.0%} of samples "
                f"below {GPU_UTIL_WARN:.0f}%): the GPU waits for the host."
            ),
            step=int(util.index[0]),
            evidence=evidence,
            recommendation=(
                "Feed the GPU: larger batches (or gradient accumulation), DataLoader with "
                "num_workers>0, pin_memory=True and prefetching, remove per-step host syncs "
                "(.item(), printing tensors), and try torch.compile / CUDA graphs for small kernels."
            ),
        )
    ]


@register_rule("perf.data-stall", title="Data loading stalls")
def data_stall(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    dt = _steady(df, DATA_TIME)
    st = _steady(df, STEP_TIME)
    med_dt, med_st = float(dt.median()), float(st.median())
    if med_st <= 0:
        raise SkipRule(f"{STEP_TIME} is zero")
    # step_time is the whole step, data loading included (docs/metrics.md); guard a loader
    # that reports more than the step by normalising against the sum.
    frac = med_dt / med_st if med_dt <= med_st else med_dt / (med_dt + med_st)
    if frac <= DATA_STALL_FRAC:
        return []
    return [
        Finding(
            id="perf.data-stall",
            severity=Severity.WARNING,
            title=f"Data loading takes {frac:.0%} of each step",
            message=(
                f"Median data time {med_dt * 1e3:.3g} ms of a {med_st * 1e3:.3g} ms step "
                f"({frac:.0%}) after warm-up: the accelerator waits for batches."
            ),
            step=int(dt.index[0]),
            evidence={
                "median_data_time_s": r(med_dt),
                "median_step_time_s": r(med_st),
                "data_frac": r(frac),
                "step_range": [int(dt.index[0]), int(dt.index[-1])],
                "impact": clamp01(frac),
            },
            recommendation=(
                "Move data work off the critical path: DataLoader(num_workers=4+, pin_memory=True, "
                "prefetch_factor=2, persistent_workers=True), pre-tokenise the dataset, avoid "
                "per-sample Python work and slow storage; check for sleeps or locks in the loader."
            ),
        )
    ]


def _throughput(df: pd.DataFrame) -> tuple[pd.Series, str]:
    if an.has_metric(df, TOKENS_PER_SEC):
        return an.metric(df, TOKENS_PER_SEC), TOKENS_PER_SEC
    st = an.metric(df, STEP_TIME)
    if len(st):
        return (1.0 / st[st > 0]), f"1/{STEP_TIME}"
    raise SkipRule(f"no {TOKENS_PER_SEC} or {STEP_TIME} in history")


@register_rule("perf.throughput-degradation", title="Throughput degrading")
def throughput_degradation(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    tp, source = _throughput(df)
    if len(tp) < THROUGHPUT_MIN_POINTS:
        raise SkipRule(f"only {len(tp)} throughput points, need {THROUGHPUT_MIN_POINTS}")
    steady = an.steady_part(tp, WARMUP_SKIP)
    trend = _trend_finding(steady, source)
    min_points = max(SLOW_MIN_POINTS, math.ceil(SLOW_MIN_SHARE * len(steady)))
    stretches = [
        s
        for s in slow_stretches(steady, frac=SLOW_FRAC, min_points=min_points, z=SLOW_Z)
        # slow from the first judged point on: warm-up that lasted longer than the skip
        if s.first > int(steady.index[0])
        # a slowdown to the end is the trend finding's, when it fired
        and (s.recovered or trend is None)
    ]
    stretches = sorted(stretches, key=lambda s: -s.time_lost_frac)[:SLOW_MAX_FINDINGS]
    warmup = (int(tp.index[0]), int(steady.index[0]) - 1)
    out = [] if trend is None else [trend]
    out += [_stretch_finding(df, s, source, warmup) for s in sorted(stretches, key=_first)]
    return out


def _first(s: SlowStretch) -> int:
    return s.first


def _trend_finding(steady: pd.Series, source: str) -> Finding | None:
    """The last quarter slower than the first, on a monotone downward trend."""
    q = max(3, len(steady) // 4)
    early, late = float(steady.iloc[:q].median()), float(steady.iloc[-q:].median())
    if early <= 0:
        return None
    drop = 1.0 - late / early
    rho = an.correlation(pd.Series(steady.index.to_numpy(dtype=float), index=steady.index), steady)
    if drop <= THROUGHPUT_DROP_INFO or not rho <= THROUGHPUT_TREND_RHO:
        return None
    cps = [c for c in an.change_points(steady, max_points=3) if c.after < c.before]
    onset = int(cps[0].step) if cps else int(steady.index[q])
    fit = an.linear_fit(steady.index.to_numpy(dtype=float), steady.to_numpy())
    return Finding(
        id="perf.throughput-degradation",
        severity=Severity.WARNING if drop > THROUGHPUT_DROP_WARN else Severity.INFO,
        title=f"Throughput fell {drop:.0%} during the run",
        message=(
            f"Median throughput ({source}) went from {early:.4g} in the first quarter to "
            f"{late:.4g} in the last quarter of the run (-{drop:.0%}); it started to fall "
            f"around step {onset}."
        ),
        step=onset,
        evidence={
            "kind": "trend",
            "source": source,
            "early_median": r(early),
            "late_median": r(late),
            "drop_frac": r(drop),
            "onset_step": onset,
            "change_points": [c.to_dict() for c in cps],
            "trend_per_1k_steps": r(fit.slope * 1000),
            "trend_r2": r(fit.r2),
            "spearman_vs_step": r(rho),
            "impact": clamp01(drop),
        },
        recommendation=(
            "A step that slows down over time usually accumulates something: Python lists of "
            "tensors or metrics, a growing autograd graph (a loss kept without .detach()), "
            "memory fragmentation (watch reserved vs allocated), thermal throttling, or "
            "competing processes. Compare the memory charts with the slowdown's onset."
        ),
    )


# What may move with a slow stretch, and how it reads in a sentence.
_COMPANIONS = {
    STEP_TIME: "step time",
    DATA_TIME: "data time",
    CPU_PERCENT: "CPU use",
    GPU_UTIL: "GPU utilisation",
}


def _show(name: str, v: float) -> str:
    if name in (CPU_PERCENT, GPU_UTIL):
        return f"{v * 100:.0f} %" if name == GPU_UTIL and v <= 1.0 else f"{v:.0f} %"
    return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"


def _data_explains(moved: dict[str, dict[str, float]]) -> bool:
    """Data time rose, by at least half of what the step time rose (when it is known): a
    loader that went from 0.1 to 0.3 ms beside a step that went from 6 to 48 ms is not it."""
    data = moved.get(DATA_TIME)
    if data is None or not data["ratio"] > math.exp(MOVED_LOG_RATIO):
        return False
    step = moved.get(STEP_TIME)
    if step is None:
        return True
    return data["inside"] - data["outside"] >= 0.5 * (step["inside"] - step["outside"])


def _stretch_finding(
    df: pd.DataFrame, s: SlowStretch, source: str, warmup: tuple[int, int]
) -> Finding:
    series = {name: an.metric(df, name) for name in _COMPANIONS}
    moved = moved_with(series, s.first, s.last, exclude=warmup)
    notable = [
        f"{_COMPANIONS[n]} {_show(n, m['outside'])} → {_show(n, m['inside'])}"
        for n, m in moved.items()
        if math.isfinite(m["ratio"]) and abs(math.log(max(m["ratio"], 1e-12))) > MOVED_LOG_RATIO
    ]
    end = f"then recovered after step {s.last}" if s.recovered else "until the end of the run"
    if _data_explains(moved):
        cause = "Data time rose with it: the input pipeline stalled (slow storage, a loader "
        cause += "worker starved of CPU, a cache that went cold). "
    elif moved.get(CPU_PERCENT, {}).get("ratio", math.nan) < math.exp(-MOVED_LOG_RATIO):
        cause = "The process got less CPU while it lasted: other jobs took the machine, or "
        cause += "it was throttled or swapping. "
    else:
        cause = ""
    return Finding(
        id="perf.throughput-degradation",
        severity=Severity.WARNING,
        title=f"Throughput at {s.frac_of_peak:.0%} of peak for steps {s.first}–{s.last}",
        message=(
            f"From step {s.first} to {s.last} ({s.points} logged points) the median throughput "
            f"({source}) was {s.median:.4g}, {s.frac_of_peak:.0%} of the run's sustained peak "
            f"{s.peak:.4g}, {end}; it cost about {s.time_lost_frac:.0%} of the run's time."
            + (f" Moved with it: {', '.join(notable)}." if notable else "")
        ),
        step=s.first,
        evidence={
            "kind": "slow_stretch",
            "source": source,
            "step_range": [s.first, s.last],
            "points": s.points,
            "median": r(s.median),
            "peak": r(s.peak),
            "frac_of_peak": r(s.frac_of_peak),
            "recovered": s.recovered,
            "time_lost_frac": r(s.time_lost_frac),
            "robust_z": r(s.z),
            "moved_with": {n: {k: r(v) for k, v in m.items()} for n, m in moved.items()},
            "impact": clamp01(2.0 * s.time_lost_frac),
        },
        recommendation=(
            cause + "A slowdown that comes and goes is the machine, not the model: check what else "
            "ran then (other jobs, a checkpoint or evaluation writing to slow storage, thermal "
            "or power capping, swapping); on a shared machine pin the job's cores or ask for "
            "an exclusive node, and compare CPU use, data time and GPU utilisation over the "
            "stretch."
        ),
    )


@register_rule("perf.low-mfu", title="Low model FLOPs utilisation")
def low_mfu(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    mfu = _steady(df, MFU)
    kind = device_kind(meta)
    if kind == "cpu":
        raise SkipRule("MFU is judged on GPU runs only (a CPU's peak is a measured matmul rate)")
    med = float(mfu.median())
    if med > 1.0:  # reported in percent
        med /= 100.0
    if med >= MFU_INFO:
        return []
    warn = med < MFU_WARN and kind is not None
    return [
        Finding(
            id="perf.low-mfu",
            severity=Severity.WARNING if warn else Severity.INFO,
            title=f"MFU {med:.0%}",
            message=(
                f"The model used a median {med:.1%} of the device's peak FLOP/s after warm-up"
                + ("" if kind else " (device unknown, so judged leniently)")
                + "."
            ),
            step=int(mfu.index[0]),
            evidence={
                "median_mfu": r(med),
                "device": kind,
                "step_range": [int(mfu.index[0]), int(mfu.index[-1])],
                "impact": clamp01(1.0 - med / MFU_INFO),
            },
            recommendation=(
                "Use bf16 autocast, larger batches or sequence packing, fused/flash attention "
                "(F.scaled_dot_product_attention), torch.compile, and dimensions that are multiples "
                "of 64; check perf.data-stall and perf.gpu-underutilized first."
            ),
        )
    ]
