"""Live alerts (Findings raised during training) and the Monitor's once-per-run helpers.

Finding ids (documented in docs/checks.md, "Live alerts"):
- ``train.nonfinite-loss``: the loss passed to ``step()`` was NaN/Inf.
- ``train.nonfinite-grad``: the gradient norm (the loop's, per step; or the Monitor's,
  measured on log steps) was NaN/Inf; or, at close, the weights or gradients were.
Each is raised once per run, at the log step that brings the interval's values to the
host (or at once with ``strict=True``), with the first offending step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdiag.findings import Finding, Severity, TdiagError
from tdiag.monitor.metrics import IntervalSummary, first_nonfinite

__all__ = [
    "NonFiniteError",
    "build_report_safely",
    "first_nonfinite_param",
    "flops_setup",
    "nonfinite_findings",
    "step_row",
]

logger = logging.getLogger(__name__)


class NonFiniteError(TdiagError):
    """Raised by ``Monitor.step()`` with ``strict=True`` when the loss or gradient norm is NaN/Inf."""


_RECOMMENDATION = (
    "Look at flight_recorder.jsonl for the steps before it. Usual causes: a learning rate too "
    "high or no warmup, no gradient clipping, fp16 overflow (use bf16 or a GradScaler), a bad "
    "batch (empty sequence, all-padding row giving 0/0), log/sqrt/division of zero in a custom "
    "loss. Re-run with watch='layers' to name the first module whose output goes non-finite."
)


def step_row(summary: IntervalSummary, i: int) -> dict[str, float]:
    """The flight recorder's row of the interval's i-th step."""
    row: dict[str, float] = {}
    if summary.losses[i] is not None:
        row["train/loss"] = summary.losses[i]
    if summary.grad_norms is not None and summary.grad_norms[i] is not None:
        row["train/grad_norm"] = summary.grad_norms[i]
    if summary.skipped is not None and summary.skipped[i]:
        row["train/skipped_steps"] = 1.0
    if i < len(summary.step_times):
        row["perf/step_time_host"] = summary.step_times[i]
    if i < len(summary.data_times):
        row["perf/data_time"] = summary.data_times[i]
    return row


def _last_finite(values: list[float | None], before: int) -> tuple[int | None, float | None]:
    for j in range(before - 1, -1, -1):
        if values[j] is not None and math.isfinite(values[j]):
            return j, values[j]
    return None, None


def nonfinite_findings(
    summary: IntervalSummary,
    metrics: Mapping[str, float],
    first_step: int,
    log_step: int,
    where: str | None,
) -> list[Finding]:
    """Findings for a NaN/Inf loss or gradient norm in the interval ``first_step..log_step``."""
    out = []
    i = first_nonfinite(summary.losses)
    if i is not None:
        j, last = _last_finite(summary.losses, i)
        out.append(
            Finding(
                id="train.nonfinite-loss",
                severity=Severity.ERROR,
                title="Loss became non-finite (NaN/Inf)",
                message=f"The loss was {summary.losses[i]} at step {first_step + i}"
                + (
                    f"; the last finite loss was {last:.4g} at step {first_step + j}."
                    if j is not None
                    else "."
                ),
                where=where,
                step=first_step + i,
                evidence={
                    "loss": summary.losses[i],
                    "last_finite_loss": last,
                    "interval": [first_step, log_step],
                    "first_nonfinite_module": where,
                },
                recommendation=_RECOMMENDATION,
            )
        )
    step, value = None, None
    if summary.grad_norms is not None:
        k = first_nonfinite(summary.grad_norms)
        if k is not None:
            step, value = first_step + k, summary.grad_norms[k]
    elif "train/grad_norm" in metrics and not math.isfinite(metrics["train/grad_norm"]):
        step, value = log_step, metrics["train/grad_norm"]
    if step is not None:
        out.append(
            Finding(
                id="train.nonfinite-grad",
                severity=Severity.ERROR,
                title="Gradient norm became non-finite (NaN/Inf)",
                message=f"The global gradient norm was {value} at step {step}.",
                where=where,
                step=step,
                evidence={"grad_norm": value, "interval": [first_step, log_step]},
                recommendation=_RECOMMENDATION,
            )
        )
    return out


def close_nonfinite_finding(step: int, where: str | None, *, grads: bool = True) -> Finding:
    """The live ``train.nonfinite-grad`` of the Monitor's check at close: the weights or
    gradients are NaN/Inf although no logged step showed it (a gradient that went non-finite
    at the last step, which was not a log step)."""
    what = "weights or gradients" if grads else "weights"
    return Finding(
        id="train.nonfinite-grad",
        severity=Severity.ERROR,
        title="Gradient became non-finite (NaN/Inf)",
        message=(
            f"At close, after step {step}, the model's {what} held NaN/Inf although no logged "
            "step showed it: a gradient went non-finite after the last log step (its update "
            "reached the weights)." + (f" First non-finite parameter: {where}." if where else "")
        ),
        where=where,
        step=step,
        evidence={
            "source": "check at close (weights and gradients)",
            "first_nonfinite_param": where,
            "checked_grads": grads,
        },
        recommendation=_RECOMMENDATION,
    )


def with_where(finding: Finding, where: str | None) -> Finding:
    if where is None:
        return finding
    evidence = {**finding.evidence, "first_nonfinite_param": where}
    return dataclasses.replace(finding, where=where, evidence=evidence)


def first_nonfinite_param(model: nn.Module) -> str | None:
    """The first parameter (``named_parameters`` order) whose gradient, else value, is NaN/Inf.

    None when none is, or when all are (after a NaN update every parameter is NaN and the
    order says nothing). Runs only when an alert fires: one fused norm, one host sync each.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
    with torch.no_grad():
        grads = [(n, p.grad) for n, p in named if p.grad is not None]
        for group in (grads, named):
            if not group:
                continue
            norms = torch._foreach_norm([t.detach() for _, t in group])
            dev = norms[0].device
            finite = torch.isfinite(torch.stack([x.float().to(dev) for x in norms])).tolist()
            bad = [name for (name, _), ok in zip(group, finite, strict=True) if not ok]
            if bad and len(bad) < len(group):  # host sync above (alert only)
                return bad[0]
    return None


def flops_setup(monitor: Any, perf: Mapping[str, Any]) -> dict[str, Any]:
    """FLOPs per token and the device's peak FLOP/s, once per run (for ``perf/mfu``)."""
    from tdiag.monitor.flops import PeakFlops, flops_per_token, peak_flops

    seq_len = monitor.options.seq_len or perf.get("seq_len")
    if not seq_len:
        reason = "sequence length unknown: pass seq_len= to Monitor"
        logger.info("tdiag: no MFU (%s)", reason)
        return {"mfu_off": True, "mfu_reason": reason}
    try:
        # The formula (6N + attention) does not run the user's model, unlike the counter.
        fpt = flops_per_token(monitor.model, int(seq_len), method="formula")
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        return {"mfu_off": True, "mfu_reason": f"FLOPs per token unknown: {exc}"}
    if monitor.options.peak_flops is not None:
        peak = PeakFlops(float(monitor.options.peak_flops), "user (peak_flops=)", "")
    else:
        peak = peak_flops(monitor.device, perf.get("dtype", torch.float32))
    out: dict[str, Any] = {"seq_len": int(seq_len), "flops_per_token": fpt}
    if peak.value is None:
        logger.info("tdiag: no MFU (%s)", peak.reason)
        out.update(mfu_off=True, mfu_reason=peak.reason)
    else:
        out.update(peak_flops=peak.value, peak_source=peak.source)
    return out


def build_report_safely(
    run_dir: Path, console: Any = None, *, deadline: float | None = None
) -> bool:
    """``tdiag.report.build_report(run_dir)`` when it exists; a failure is logged, never raised.
    ``console``: a rich Console for the report's short terminal summary (None: no summary).

    ``deadline`` (a ``time.monotonic()`` value): build in a child process and stop waiting
    then (after SIGTERM the process must be gone before torchrun's / Slurm's SIGKILL). The
    report files are written by temp file + rename, so an unfinished build leaves none torn.

    Returns:
        True when the report was written; False when it failed, is unavailable or was not done
        by the deadline.
    """
    try:
        from tdiag.report import build_report
    except ImportError:
        logger.debug("tdiag.report.build_report is not available; no report written")
        return False
    done: list[bool] = []

    def build() -> None:
        try:
            build_report(run_dir, console=console)
            done.append(True)
        except Exception as exc:  # the report must never turn a finished run into a crash
            logger.warning("tdiag: building the report failed (%s: %s)", type(exc).__name__, exc)
            logger.debug("traceback", exc_info=exc)

    if deadline is None:
        build()
        return bool(done)
    return _build_in_child(run_dir, deadline)


def _build_in_child(run_dir: Path, deadline: float) -> bool:
    """``tdiag report RUN_DIR`` in a child process of its own session: waited for until
    ``deadline``, then left to finish on its own (it is not in the job's process group, so
    the scheduler's kill of the training processes does not take it; if it is killed anyway,
    the report files are never torn). A thread would be cut down at interpreter exit,
    sometimes in C++ code (an abort); a process is not."""
    import subprocess
    import sys

    try:
        with open(Path(run_dir) / "report.log", "wb") as log:  # its output, not our pipes
            child = subprocess.Popen(
                [sys.executable, "-m", "tdiag.cli", "report", str(run_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as exc:
        logger.warning(
            "tdiag: could not start the report (%s); run `tdiag report %s`", exc, run_dir
        )
        return False
    try:
        return child.wait(timeout=max(0.0, deadline - time.monotonic())) in (0, 1)
    except subprocess.TimeoutExpired:
        logger.warning(
            "tdiag: the report is still being built (process %d) after the signal; it "
            "completes on its own, or run `tdiag report %s`",
            child.pid,
            run_dir,
        )
        return False


def input_info(module: nn.Module, args: Any, kwargs: Any) -> dict[str, Any]:
    """Sequence length (last dim of the first input, when 2-D+) and the matmul dtype
    (the autocast dtype when autocast is on, else the parameters'), from the first forward."""
    out: dict[str, Any] = {}
    ids = args[0] if args else kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        out["seq_len"] = int(ids.shape[-1])
    p = next(module.parameters(), None)
    device_type = p.device.type if p is not None else "cpu"
    if torch.is_autocast_enabled(device_type):
        out["dtype"] = torch.get_autocast_dtype(device_type)
    elif p is not None:
        out["dtype"] = p.dtype
    return out


class MfuMeter:
    """``perf/mfu`` = tokens/s per device × FLOPs per token / peak FLOP/s of one device.

    FLOPs per token (6N + attention formula, from ``tdiag.monitor.flops``) and the peak
    (table by GPU name and dtype, measured on CPU, or ``peak_flops=``) are found once, at
    the first log step; :attr:`setup_seconds` says how long that took (the Monitor keeps it
    out of the step time). No MFU, with the reason in :attr:`info`, when either is unknown.
    """

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.info: dict[str, Any] = {}
        self.setup_seconds = 0.0
        self.input_seen = False

    def observe_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not self.input_seen:
            self.input_seen = True
            self.info.update(input_info(module, args, kwargs))

    def metrics(self, tokens_per_sec: float | None, world_size: int) -> dict[str, float]:
        if tokens_per_sec is None or self.info.get("mfu_off"):
            return {}
        if "flops_per_token" not in self.info:
            t0 = time.perf_counter()
            self.info.update(flops_setup(self.monitor, self.info))
            self.setup_seconds = time.perf_counter() - t0
        from tdiag.monitor.flops import mfu

        value = mfu(
            tokens_per_sec / world_size,
            self.info.get("flops_per_token"),
            self.info.get("peak_flops"),
        )
        if value is not None and value > 1.0 and self._peak_was_measured():
            value = self._raise_measured_peak(value)
        return {} if value is None else {"perf/mfu": value}

    def _peak_was_measured(self) -> bool:
        return str(self.info.get("peak_source", "")).startswith("measured")

    def _raise_measured_peak(self, value: float) -> float:
        """A CPU peak measured while other work shared the cores comes out too low, and MFU
        then reads above 100%. A peak is a maximum: take the best of a fresh measurement and
        the FLOP/s just achieved, say so in meta (``peak_source``), and recompute."""
        from tdiag.monitor.flops import _MEASURED, _dtype_key, measure_cpu_peak

        achieved = value * float(self.info["peak_flops"])
        _MEASURED.clear()
        dtype_key = _dtype_key(self.info.get("dtype", torch.float32), "cpu")
        fresh = measure_cpu_peak(dtype_key).value or 0.0
        new_peak = max(float(self.info["peak_flops"]), fresh, achieved)
        self.info["peak_flops"] = new_peak
        self.info["peak_source"] = (
            f"{self.info['peak_source']}; raised to {new_peak:.3g} FLOP/s after a log step "
            "achieved more than the first measurement (the cores were busy when it ran)"
        )
        return achieved / new_peak

    def to_meta(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.info.items()}
