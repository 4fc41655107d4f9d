"""Headline numbers of a run, computed from its history DataFrame (Contract 3 names).

Pure: a DataFrame and the meta dict in, a flat dict of numbers out. Every key is present;
a number the history cannot give is ``None`` (rendered as "–"), never a guess — except
``tokens``, which is estimated from throughput when no cumulative token count was logged
and says so in ``tokens_estimated``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["SUMMARY_KEYS", "logged_mask", "numeric_column", "summarize"]

# Cumulative token counters a logger may write (first one present wins).
_TOKEN_COLUMNS = ("train/tokens", "train/tokens_seen", "perf/tokens_total", "tokens")
_MEMORY_COLUMNS = (
    (
        "peak_gpu_mem_gb",
        ("sys/gpu_mem_peak_gb", "sys/gpu_mem_reserved_gb", "sys/gpu_mem_allocated_gb"),
    ),
    ("peak_rss_gb", ("sys/rss_gb",)),
)

SUMMARY_KEYS = (
    "rows",
    "first_step",
    "last_step",
    "steps",
    "tokens",
    "tokens_estimated",
    "wall_time_s",
    "run_time_s",
    "final_train_loss",
    "final_train_loss_from_step",
    "final_train_loss_last",
    "best_train_loss",
    "best_train_loss_step",
    "final_val_loss",
    "best_val_loss",
    "best_val_loss_step",
    "mean_tokens_per_sec",
    "peak_tokens_per_sec",
    "mean_mfu",
    "peak_mfu",
    "mfu_peak_source",
    "peak_gpu_mem_gb",
    "peak_rss_gb",
    "metrics",
)


def numeric_column(df: pd.DataFrame, name: str) -> pd.Series | None:
    """``df[name]`` as float64 (non-numbers -> NaN), or None when the column is absent."""
    if name not in df.columns:
        return None
    col = df[name]
    if col.dtype == np.float64:
        return col
    return pd.to_numeric(col, errors="coerce").astype(np.float64)


def logged_mask(df: pd.DataFrame, name: str) -> np.ndarray:
    """Rows on which ``name`` was logged. A NaN cell is either "not on this row" or "logged
    as NaN"; it counts as logged when the row carries another metric of the same family
    (``train/loss`` NaN next to a ``train/lr``), which is how the Monitor writes its rows."""
    col = numeric_column(df, name)
    if col is None:
        return np.zeros(len(df), dtype=bool)
    y = col.to_numpy()
    logged = ~np.isnan(y)
    if logged.all():
        return logged
    logged = _siblings_logged(df, name, logged)
    dropped = df.attrs.get("tdiag_dropped_rows", {}).get(name)  # tdiag.history.DROPPED_ATTR
    if dropped:  # cells the reader dropped (not numbers in the file): missing, not logged
        logged &= ~df.index.isin(dropped)
    return logged


def _siblings_logged(df: pd.DataFrame, name: str, logged: np.ndarray) -> np.ndarray:
    family = name.split("/", 1)[0] + "/"
    siblings = [c for c in df.columns if c != name and c.startswith(family)]
    for sibling in siblings:
        s = numeric_column(df, sibling)
        if s is not None:
            logged |= ~np.isnan(s.to_numpy())
    if siblings:
        return logged
    # A metric without siblings (``val/loss``) is written on a row of its own: a row that
    # carries nothing else (``{"step": 150, "val/loss": "NaN"}``) logged it as NaN. (With
    # siblings, an all-NaN row proves nothing: it may be another family's NaN row.)
    maybe = np.flatnonzero(~logged)
    for other in df.columns:  # loop over columns; the candidate rows shrink as we go
        if not len(maybe):
            break
        if other in ("step", "time", name):
            continue
        maybe = maybe[df[other].iloc[maybe].isna().to_numpy()]
    logged[maybe] = True
    return logged


def _finite(series: pd.Series | None) -> pd.Series | None:
    if series is None:
        return None
    values = series.to_numpy()
    mask = np.isfinite(values)
    if not mask.any():
        return None
    return series[mask]


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _final_and_best(df: pd.DataFrame, name: str) -> tuple[float | None, float | None, int | None]:
    """Last logged value (may be non-finite: a NaN at the end is news), best finite value and its step."""
    col = numeric_column(df, name)
    if col is None:
        return None, None, None
    present = col[logged_mask(df, name)]
    final = float(present.iloc[-1]) if len(present) else None  # NaN/Inf at the end is news
    finite = _finite(col)
    if finite is None:
        return final, None, None
    idx = finite.idxmin()
    return final, float(finite.loc[idx]), int(df["step"].loc[idx])


def _final_interval(df: pd.DataFrame) -> tuple[int | None, float | None]:
    """The first step of the last log interval (``train/loss`` is the interval's mean, from
    the step after the previous logged row) and the loss of its last step alone
    (``train/loss_last``, when the logger wrote it)."""
    mask = logged_mask(df, "train/loss")
    steps = df["step"].to_numpy()[mask] if "train/loss" in df.columns else np.array([])
    start = int(steps[-2]) + 1 if len(steps) >= 2 else None
    last = numeric_column(df, "train/loss_last")
    last_value = None
    if last is not None and mask.any():
        value = last[mask].iloc[-1]
        last_value = float(value) if not np.isnan(value) else None
    return start, last_value


def _run_time(meta: Mapping[str, Any] | None) -> float | None:
    """Seconds from the Monitor's start to its end (meta.json), the figure its console's last
    line prints; None without both times."""
    if not meta:
        return None
    start, end = meta.get("start_time"), (meta.get("end") or {}).get("time")
    if isinstance(start, int | float) and isinstance(end, int | float) and end >= start:
        return _num(end - start)
    return None


def _mean_and_peak(df: pd.DataFrame, name: str) -> tuple[float | None, float | None]:
    finite = _finite(numeric_column(df, name))
    if finite is None:
        return None, None
    return _num(finite.mean()), _num(finite.max())


def _tokens(df: pd.DataFrame, steps: int) -> tuple[float | None, bool]:
    """Total tokens: the last cumulative counter if logged, else tokens/s x step time x steps."""
    for name in _TOKEN_COLUMNS:
        finite = _finite(numeric_column(df, name))
        if finite is not None:
            return float(finite.iloc[-1]), False
    tps = numeric_column(df, "perf/tokens_per_sec")
    step_time = numeric_column(df, "perf/step_time")
    if tps is None or step_time is None or steps <= 0:
        return None, False
    per_step = _finite(tps * step_time)
    if per_step is None:
        return None, False
    return float(per_step.mean()) * steps, True


def _step_count(df: pd.DataFrame, steps: np.ndarray) -> int:
    """Optimizer steps done, from the rows of training metrics (``train/*``).

    Logged steps count optimizer steps done (1-based); a 0-based logger starts at 0. Only
    training rows say which: a ``mon.log()`` before the first ``step()`` (a val loss at step
    0, as nanoGPT evaluates at iteration 0) is not a training step. Without any ``train/*``
    metric every row counts.
    """
    rows = logged_mask(df, "train/loss")  # a NaN loss is a step too
    for name in (c for c in df.columns if c.startswith("train/")):  # columns, not rows
        col = numeric_column(df, name)
        if col is not None:
            rows |= ~np.isnan(col.to_numpy())
    train_steps = steps[rows] if rows.any() else steps
    first, last = int(train_steps.min()), int(train_steps.max())
    return last + 1 if first == 0 else last


def summarize(df: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Headline numbers of a run.

    Args:
        df: the history as read by :func:`tdiag.history.read_history` (needs a ``step`` column).
        meta: the run's meta.json (may be None): the Monitor's start and end times
            (``run_time_s``) and where the MFU's peak came from (``mfu_peak_source``).

    Returns:
        A dict with every key of :data:`SUMMARY_KEYS`; values are floats/ints or None.
        ``steps`` counts optimizer steps done (the last training step, +1 when training steps
        start at 0; rows without ``train/*`` metrics, such as a val loss logged before the
        first step, do not count), ``wall_time_s`` spans
        the first to the last logged ``time``, ``run_time_s`` the Monitor's start to end (from
        meta.json); losses are per-token means as logged: ``final_train_loss`` is the last
        row's ``train/loss``, the mean of its log interval (which starts at
        ``final_train_loss_from_step``), ``final_train_loss_last`` the loss of that interval's
        last step alone.
    """
    out: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    out["run_time_s"] = _run_time(meta)
    source = ((meta or {}).get("perf") or {}).get("peak_source")
    out["mfu_peak_source"] = source if isinstance(source, str) else None
    steps = df["step"].to_numpy()
    out["rows"] = len(df)
    out["metrics"] = sorted(c for c in df.columns if c not in ("step", "time"))
    if len(steps) == 0:
        return out
    first, last = int(steps.min()), int(steps.max())
    out["first_step"], out["last_step"] = first, last
    out["steps"] = _step_count(df, steps)
    times = _finite(numeric_column(df, "time"))
    if times is not None and len(times) > 1:
        out["wall_time_s"] = float(times.max() - times.min())
    out["tokens"], out["tokens_estimated"] = _tokens(df, out["steps"])
    out["final_train_loss"], out["best_train_loss"], out["best_train_loss_step"] = _final_and_best(
        df, "train/loss"
    )
    out["final_train_loss_from_step"], out["final_train_loss_last"] = _final_interval(df)
    out["final_val_loss"], out["best_val_loss"], out["best_val_loss_step"] = _final_and_best(
        df, "val/loss"
    )
    out["mean_tokens_per_sec"], out["peak_tokens_per_sec"] = _mean_and_peak(
        df, "perf/tokens_per_sec"
    )
    out["mean_mfu"], out["peak_mfu"] = _mean_and_peak(df, "perf/mfu")
    for key, names in _MEMORY_COLUMNS:
        for name in names:
            _, peak = _mean_and_peak(df, name)
            if peak is not None:
                out[key] = peak
                break
    return out


# ---------------------------------------------------------------- formatting (HTML and console)


def format_number(value: Any, *, digits: int = 4) -> str:
    """Human-readable number: ints with thousands separators, floats to ``digits`` significant."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value)


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h 02m 05s"``; None -> "–"."""
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {sec:02d}s"
    return f"{minutes}m {sec:02d}s"


def _big(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale * 0.9995:  # 999,999 reads "1M", not "1e+03k"
            return f"{value / scale:.3g}{unit}"
    return format_number(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def headline_cards(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The headline numbers as ``[{"label", "value", "sub"}]``, in reading order.

    Each number says what it is where two readings exist: the final train loss is the last
    log interval's mean (a trainer that prints its last step's loss prints another number),
    the wall time is the Monitor's start to end (the figure its console's last line prints),
    and an MFU against a measured matmul (a CPU: no datasheet peak) says so.
    """
    s = summary

    def at(step: Any) -> str:
        return f"best at step {format_number(step)}" if step is not None else ""

    tokens = _big(s.get("tokens"))
    return [
        {"label": "Steps", "value": format_number(s.get("steps")), "sub": f"{format_number(s.get('rows'))} row{'' if s.get('rows') == 1 else 's'} logged"},
        {"label": "Tokens", "value": tokens, "sub": "estimated from throughput" if s.get("tokens_estimated") else ""},
        _wall_time_card(s),
        _final_loss_card(s),
        {"label": "Best train loss", "value": format_number(s.get("best_train_loss")), "sub": at(s.get("best_train_loss_step"))},
        {"label": "Final val loss", "value": format_number(s.get("final_val_loss")), "sub": ""},
        {"label": "Best val loss", "value": format_number(s.get("best_val_loss")), "sub": at(s.get("best_val_loss_step"))},
        {"label": "Tokens / s", "value": _big(s.get("mean_tokens_per_sec")), "sub": f"mean; peak {_big(s.get('peak_tokens_per_sec'))}"},
        _mfu_card(s),
        # no card for GPU memory a run never had (a CPU run): a "–" reads as "not measured"
        *([{"label": "Peak GPU memory", "value": _gb(s["peak_gpu_mem_gb"]), "sub": ""}] if s.get("peak_gpu_mem_gb") is not None else []),
        {"label": "Peak process RSS", "value": _gb(s.get("peak_rss_gb")), "sub": ""},
        *_nonfinite_card(s),
    ]  # fmt: skip


def _wall_time_card(s: Mapping[str, Any]) -> dict[str, str]:
    logged = s.get("wall_time_s")
    if s.get("run_time_s") is None:
        return {"label": "Wall time", "value": format_duration(logged), "sub": "first to last logged row" if logged is not None else ""}  # fmt: skip
    sub = "Monitor start to end"
    if logged is not None:
        sub += f"; logged rows span {format_duration(logged)}"
    return {"label": "Wall time", "value": format_duration(s["run_time_s"]), "sub": sub}


def _final_loss_card(s: Mapping[str, Any]) -> dict[str, str]:
    final = s.get("final_train_loss")
    parts = []
    if final is not None:
        first, last_step = s.get("final_train_loss_from_step"), s.get("last_step")
        span = (
            f"steps {format_number(first)}–{format_number(last_step)}"
            if first is not None
            else "last logged row"
        )
        parts.append(f"mean of {span}")
        if s.get("final_train_loss_last") is not None and first != last_step:
            parts.append(f"last step alone {format_number(s['final_train_loss_last'])}")
    return {"label": "Final train loss", "value": format_number(final), "sub": "; ".join(parts)}  # fmt: skip


def _mfu_card(s: Mapping[str, Any]) -> dict[str, str]:
    sub = f"mean; peak {_pct(s.get('peak_mfu'))}"
    if str(s.get("mfu_peak_source") or "").startswith("measured"):
        # no datasheet peak (a CPU): the ratio is to this machine's own best matmul, which the
        # report does not judge; said in the label, so that "98 %" is not read as MFU
        return {"label": "vs measured matmul peak", "value": _pct(s.get("mean_mfu")), "sub": f"{sub}; not MFU: no datasheet peak for this device"}  # fmt: skip
    return {"label": "MFU", "value": _pct(s.get("mean_mfu")), "sub": sub}


def _nonfinite_card(s: Mapping[str, Any]) -> list[dict[str, str]]:
    """NaN/Inf values logged: data (a NaN loss is news), not a problem reading the history."""
    n = s.get("nonfinite_values")
    if not n:
        return []
    return [{"label": "NaN/Inf logged", "value": format_number(n), "sub": "values in the history; see the findings"}]  # fmt: skip


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} GB"
