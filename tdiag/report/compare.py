"""``tdiag compare RUN_A RUN_B [RUN_C …]``: what changed between runs, as JSON and one page.

Each run folder is read as ``tdiag report`` reads it and its rules are evaluated; then
(pure functions, no I/O):

- the config and environment diff (meta.json ``config`` / ``environment``, flattened to
  dotted keys; only the keys whose values differ, a key absent from a run shown as absent);
- the findings present in some runs and not in others (keyed by id and ``where``);
- the first step where the training loss curves separate beyond their noise
  (:func:`loss_separation`), each run against the first;
- throughput and memory side by side (:func:`perf_table`);
- whether the runs are overlaid by step or by tokens (:func:`tokens_per_step`: by tokens
  when their tokens per step differ).

:func:`compare_runs` assembles ``compare.json`` (``"compare_schema": 1``); the page is
rendered by :mod:`tdiag.report.compare_page`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tdiag.findings import Finding, to_jsonable
from tdiag.report.separation import Separation, loss_separation

if TYPE_CHECKING:
    import pandas as pd

    from tdiag.history import ReadStats

__all__ = [
    "COMPARE_JSON",
    "COMPARE_SCHEMA",
    "RunData",
    "Separation",
    "compare_runs",
    "diff_mappings",
    "findings_diff",
    "load_run",
    "loss_separation",
    "perf_table",
    "tokens_per_step",
]

COMPARE_SCHEMA = 1
"""The compare.json format (``"compare_schema"``)."""
COMPARE_JSON = "compare.json"

LOSS = "train/loss"
TOKENS = "train/tokens"
# Runs are overlaid by tokens when their tokens per step differ by more than this.
TOKENS_REL_TOL = 0.01


# ------------------------------------------------------------------------------ runs
@dataclass
class RunData:
    """One run, read and analysed as ``tdiag report`` would.

    Attributes:
        name: display name (unique among the compared runs).
        source: the path given.
        folder: the run folder (meta.json, events.jsonl, report.html live there).
        df: the history frame; stats: what the reader skipped.
        meta: meta.json (``{}`` when absent); findings: the report's ranked findings.
        problems: sentences about what could not be read.
    """

    name: str
    source: str
    folder: Path
    df: pd.DataFrame
    stats: ReadStats
    meta: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_run(path: str | Path, *, name: str | None = None) -> RunData:
    """Read a run folder (or a history.jsonl) and evaluate the report's rules on it.

    Raises:
        HistoryReadError: the history cannot be read (the message names the file).
    """
    from tdiag.history import read_history
    from tdiag.report import _live_alerts, _locate, _read_events, _read_meta
    from tdiag.report.render_html import run_name
    from tdiag.report.rules import evaluate

    history_path, folder = _locate(Path(path))
    df, stats = read_history(history_path)
    meta, meta_problems = _read_meta(folder)
    events, event_problems = _read_events(folder)
    _, alert_problems = _live_alerts(events)
    result = evaluate(df, meta, events)
    return RunData(
        name=name or run_name(meta, str(path)),
        source=str(path),
        folder=folder,
        df=df,
        stats=stats,
        meta=meta,
        findings=list(result.findings),
        problems=[*stats.problems, *meta_problems, *event_problems, *alert_problems],
    )


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats made distinct (``run``, ``run (2)``, …)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


# ------------------------------------------------------------------------- the diffs
_ABSENT = {"absent": True}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj} if prefix else {}


def diff_mappings(items: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """The dotted keys whose values differ between ``items`` (nested dicts), in first-seen
    order: ``[{"key": "lr", "values": [0.001, 0.003]}]``. A key missing from an item has
    the value ``{"absent": True}`` there. Equal values (``1`` and ``1.0`` too) are left out.
    """
    flats = [_flatten(dict(m or {})) for m in items]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    out = []
    for k in keys:
        values = [f.get(k, _ABSENT) if k in f else _ABSENT for f in flats]
        first = values[0]
        if all(_same(first, v) for v in values[1:]):
            continue
        out.append({"key": k, "values": values})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if _num(a) and _num(b):
        return a == b
    return type(a) is type(b) and a == b


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def findings_diff(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Findings (by id and ``where``) that some runs have and others do not.

    Returns:
        ``[{"id", "where", "severity", "title", "in": [names], "not_in": [names],
        "steps": {name: step}}]``, worst severity first.
    """
    seen: dict[tuple[str, str | None], dict[str, Any]] = {}
    for run in runs:
        for f in run.findings:
            key = (f.id, f.where)
            entry = seen.setdefault(
                key,
                {"id": f.id, "where": f.where, "severity": f.severity, "title": f.title,
                 "in": [], "steps": {}},
            )  # fmt: skip
            if run.name not in entry["in"]:
                entry["in"].append(run.name)
                entry["steps"][run.name] = f.step
            if f.severity.rank < entry["severity"].rank:
                entry["severity"], entry["title"] = f.severity, f.title
    names = [r.name for r in runs]
    out = []
    for entry in seen.values():
        if len(entry["in"]) == len(names):
            continue
        entry["not_in"] = [n for n in names if n not in entry["in"]]
        out.append(entry)
    out.sort(key=lambda e: (e["severity"].rank, e["id"]))
    for e in out:
        e["severity"] = e["severity"].value
    return out


# ------------------------------------------------------------------ tokens and perf
def tokens_per_step(run: RunData) -> float | None:
    """Tokens per optimizer step: the slope of the cumulative ``train/tokens`` column, else
    meta config ``batch_size * seq_len`` (``* grad_accum``); None when unknown."""
    from tdiag.report import analyses as an
    from tdiag.report.rules._common import meta_float

    tok = an.metric(run.df, TOKENS)
    if len(tok) >= 3:
        dx = np.diff(tok.index.to_numpy(dtype=float))
        dy = np.diff(tok.to_numpy())
        ok = dx > 0
        if ok.any():
            return float(np.median(dy[ok] / dx[ok]))
    bs = meta_float(run.meta, "config.batch_size", "config.per_device_train_batch_size")
    seq = meta_float(
        run.meta, "config.seq_len", "config.block_size", "config.model.max_seq_len",
        "config.max_seq_len",
    )  # fmt: skip
    if bs is None or seq is None:
        return None
    accum = meta_float(run.meta, "config.grad_accum", "config.gradient_accumulation_steps") or 1
    return bs * seq * accum


def overlay_axis(runs: Sequence[RunData]) -> tuple[str, list[float | None]]:
    """("tokens", per-run tokens per step) when the runs' tokens per step differ (and are
    all known), else ("step", …)."""
    tps = [tokens_per_step(r) for r in runs]
    known = [t for t in tps if t is not None and t > 0]
    if len(known) == len(runs) and max(known) > min(known) * (1 + TOKENS_REL_TOL):
        return "tokens", tps
    return "step", tps


def x_values(run: RunData, series: pd.Series, axis: str, tps: float | None) -> np.ndarray:
    """The x of ``series`` in ``axis`` units: steps, or tokens seen (the cumulative
    ``train/tokens`` at those steps when logged, else step * tokens per step)."""
    from tdiag.report import analyses as an

    steps = series.index.to_numpy(dtype=float)
    if axis == "step":
        return steps
    tok = an.metric(run.df, TOKENS)
    if len(tok) >= 2:
        return np.interp(steps, tok.index.to_numpy(dtype=float), tok.to_numpy())
    return steps * float(tps or 1.0)


# What the side-by-side table shows: (key, metric, statistic, label, unit).
PERF_ROWS = (
    ("tokens_per_sec", "perf/tokens_per_sec", "median", "throughput", "tokens/s"),
    ("step_time_s", "perf/step_time", "median", "step time", "s"),
    ("data_time_s", "perf/data_time", "median", "data time", "s"),
    ("mfu", "perf/mfu", "median", "MFU", ""),
    ("gpu_util", "sys/gpu_util", "median", "GPU utilisation", "%"),
    ("cpu_percent", "sys/cpu_percent", "median", "CPU use", "%"),
    ("gpu_mem_peak_gb", "sys/gpu_mem_peak_gb", "max", "GPU memory peak", "GB"),
    ("gpu_mem_reserved_gb", "sys/gpu_mem_reserved_gb", "max", "GPU memory reserved", "GB"),
    ("rss_gb", "sys/rss_gb", "max", "process memory (RSS)", "GB"),
)


def perf_table(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Throughput and memory side by side: one row per statistic logged by some run,
    ``{"key", "label", "unit", "metric", "stat", "values": [per run, None if absent],
    "ratio_to_first": [...]}``. Medians skip the first 10 % of steps (warm-up)."""
    from tdiag.report import analyses as an

    rows = []
    for key, name, stat, label, unit in PERF_ROWS:
        values: list[float | None] = []
        for run in runs:
            s = an.metric(run.df, name)
            if len(s) == 0:
                values.append(None)
                continue
            s = an.steady_part(s, 0.1) if stat == "median" else s
            values.append(float(s.median() if stat == "median" else s.max()))
        if all(v is None for v in values):
            continue
        base = values[0]
        ratios = [(v / base) if v is not None and base not in (None, 0) else None for v in values]
        rows.append({"key": key, "label": label, "unit": unit, "metric": name, "stat": stat,
                     "values": values, "ratio_to_first": ratios})  # fmt: skip
    return rows


def _run_entry(run: RunData, tps: float | None) -> dict[str, Any]:
    from tdiag.findings import count_by_severity
    from tdiag.report import analyses as an

    loss = an.metric(run.df, LOSS)
    t = an.metric(run.df, "time")
    steps = run.df["step"]
    return {
        "name": run.name,
        "source": run.source,
        "folder": str(run.folder),
        "rows": len(run.df),
        "first_step": int(steps.min()) if len(steps) else None,
        "last_step": int(steps.max()) if len(steps) else None,
        "final_loss": float(loss.iloc[-1]) if len(loss) else None,
        "min_loss": float(loss.min()) if len(loss) else None,
        "wall_s": float(t.iloc[-1] - t.iloc[0]) if len(t) >= 2 else None,
        "tokens_per_step": tps,
        "counts": count_by_severity(run.findings),
        "problems": list(run.problems),
        "has_config": bool(run.meta.get("config")),
        "has_environment": bool(run.meta.get("environment")),
    }


def separations(runs: Sequence[RunData], axis: str, tps: Sequence[float | None]) -> list[dict]:
    """Each run's loss against the first run's: ``[{"a", "b", **Separation}]``."""
    from tdiag.report import analyses as an

    out = []
    ref = runs[0]
    la = an.metric(ref.df, LOSS)
    for run, t in zip(runs[1:], tps[1:], strict=True):
        lb = an.metric(run.df, LOSS)
        if len(la) == 0 or len(lb) == 0:
            sep = Separation(None, axis, None, None, None, None, 0, 0, None, f"no {LOSS}")
        else:
            sep = loss_separation(
                x_values(ref, la, axis, tps[0]), la.to_numpy(),
                x_values(run, lb, axis, t), lb.to_numpy(), axis=axis,
            )  # fmt: skip
        out.append({"a": ref.name, "b": run.name, **sep.to_dict()})
    return out


def compare_runs(runs: Sequence[RunData]) -> dict[str, Any]:
    """compare.json: ``{"compare_schema": 1, "tdiag_version", "axis", "runs": [...],
    "config_diff", "environment_diff", "findings_diff", "loss_separation", "perf"}``
    (strict-JSON-safe).

    Raises:
        ValueError: fewer than two runs.
    """
    from tdiag import __version__

    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    axis, tps = overlay_axis(runs)
    out = {
        "compare_schema": COMPARE_SCHEMA,
        "tdiag_version": __version__,
        "axis": axis,
        "runs": [_run_entry(r, t) for r, t in zip(runs, tps, strict=True)],
        "config_diff": diff_mappings([r.meta.get("config") for r in runs]),
        "environment_diff": diff_mappings([r.meta.get("environment") for r in runs]),
        "findings_diff": findings_diff(runs),
        "loss_separation": separations(runs, axis, tps),
        "perf": perf_table(runs),
    }
    return to_jsonable(out)
