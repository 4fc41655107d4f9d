"""The Monitor's options, validated once at construction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MonitorConfig", "infer_clip"]


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """The Monitor's options (keyword arguments of :class:`Monitor`)."""

    run_dir: str | Path = "reports/run"
    """Run folder: history.jsonl, meta.json, events.jsonl, TensorBoard files, the report."""
    log_every: int = 10
    """Steps per log interval; step 1 is also logged. Host syncs happen on log steps only."""
    total_steps: int | None = None
    """Planned number of steps (progress bar and ETA)."""
    watch: str | None = None
    """None, or "layers": per-layer grad norms, activation RMS, attention, logits (log steps)."""
    tensorboard: bool = True
    """Write TensorBoard event files under the run folder."""
    wandb: dict[str, Any] | None = None
    """``wandb.init`` keyword arguments (e.g. ``dict(project=...)``); None: no wandb."""
    console: bool | str = "auto"
    """"auto"/True: live console (bar on a TTY, plain lines otherwise); False: none."""
    quiet: bool = False
    """Console prints only error-level Findings."""
    strict: bool = False
    """Check the loss/grad norm every step (one host sync per step) and raise NonFiniteError."""
    seq_len: int | None = None
    """Tokens per sequence for the FLOP count (default: read from the first forward's input)."""
    flight_recorder: int = 200
    """Steps kept by the flight recorder (0: off)."""
    report: bool = True
    """Build the report (report.json/html) on close, when tdiag.report is available."""
    clip: float | None = None
    """Gradient clipping threshold, for train/grad_clip_frac (default: from config's grad_clip...)."""
    update_ratio: bool = True
    """Measure ||Δθ||/||θ|| on log steps (one transient copy of the parameters)."""
    system: bool = True
    """Sample CPU/RSS/GPU utilisation in a background thread."""
    system_interval_s: float = 5.0
    """Seconds between system samples."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU (default: tdiag's table, or measured on CPU)."""
    handle_signals: bool = True
    """Turn SIGTERM/SIGINT into a flag (``stop_requested``), flush, report, exit 143/130."""
    ignore: Sequence[str] = ()
    """Loop-check ids not to raise (e.g. ``["data.repeated-batch"]`` when overfitting one
    batch on purpose); see docs/checks.md, "Loop checks"."""
    spikes: bool = True
    """Detect loss spikes live on the per-step losses (``train.loss-spikes``; host-side at
    the log step, no extra sync; docs/monitor.md, "Spikes")."""
    spike_window: int = 50
    """Trailing per-step losses the spike baseline (median) and noise (MAD of differences)
    are taken over."""
    spike_z: float = 6.0
    """A spike exceeds the trailing median by more than this many robust sigmas ..."""
    spike_rel: float = 0.25
    """... and by more than this fraction of the median."""
    on_nonfinite: str | None = None
    """Guard (docs/monitor.md, "Guard"): None (observe only), "stop", "skip" or "rollback"
    on a NaN/Inf gradient or loss. Not None: one host sync per step (the check must come
    before ``optimizer.step()``)."""
    on_spike: str | None = None
    """Guard on a live loss spike: None (observe only), "stop" or "rollback" (at the log
    step that finds it). "rollback" restores the snapshots of ``forensics=True``, or, without
    it, the guard's own (the same cadence, ``snapshot_every``)."""
    forensics: bool = False
    """Keep what a replay needs (the recent batches, RNG states, a snapshot of the model and
    optimizer every ``snapshot_every`` steps, off the device) and, on the first NaN/Inf,
    replay the failing step to name the module, direction, op and cause (docs/monitor.md,
    "Forensics"). Needs ``loss_fn`` and ``mon.step(loss, batch=batch)``."""
    loss_fn: Callable[..., Any] | None = None
    """``loss_fn(model, batch) -> loss`` (Contract 1's ``loss_fn``): re-runs a step in the
    replay. The HF and Lightning adapters supply it."""
    snapshot_every: int = 50
    """Steps between forensics snapshots (rounded up to a log step)."""

    def __post_init__(self) -> None:
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {self.log_every!r}")
        if self.watch not in (None, "layers"):
            raise ValueError(f"watch must be None or 'layers', got {self.watch!r}")
        if self.total_steps is not None and self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps!r}")
        if self.console not in (True, False, "auto"):
            raise ValueError(f"console must be 'auto', True or False, got {self.console!r}")
        if self.flight_recorder < 0:
            raise ValueError(f"flight_recorder must be >= 0, got {self.flight_recorder!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip!r}")
        if isinstance(self.ignore, str) or not all(isinstance(i, str) for i in self.ignore):
            raise TypeError(f"ignore must be a list of Finding ids, got {self.ignore!r}")
        from tdiag.monitor.loopchecks import LOOP_CHECKS

        unknown = sorted(set(self.ignore) - set(LOOP_CHECKS))
        if unknown:
            raise ValueError(
                f"ignore: unknown id(s) {unknown}; the loop checks are {sorted(LOOP_CHECKS)}"
            )
        from tdiag.monitor.guard import validate_guard_options
        from tdiag.monitor.spikes import SpikeDetector

        SpikeDetector(window=self.spike_window, z=self.spike_z, rel=self.spike_rel)  # validates
        validate_guard_options(self.on_nonfinite, self.on_spike)
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int >= 1, got {self.snapshot_every!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(
                f"loss_fn must be callable (model, batch) -> loss, got {self.loss_fn!r}"
            )
        if self.forensics and self.loss_fn is None:
            raise ValueError(
                "forensics=True needs loss_fn=: a function (model, batch) -> loss that re-runs "
                "one step in the replay (the HF and Lightning adapters pass one)"
            )
        if self.wandb is not None and not isinstance(self.wandb, Mapping):
            raise TypeError(f"wandb must be a dict of wandb.init arguments, got {self.wandb!r}")


_CLIP_KEYS = ("grad_clip", "clip_grad_norm", "max_grad_norm", "clip_grad", "gradient_clip_val")


def infer_clip(config: Any) -> float | None:
    """The clipping threshold from a run config dict (first positive of ``_CLIP_KEYS``)."""
    if not isinstance(config, Mapping):
        return None
    for key in _CLIP_KEYS:
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def build_sinks(
    options: MonitorConfig, extra: Sequence[Any] = (), *, files: bool = True
) -> list[Any]:
    """The sinks the options switch on (history/events always, unless ``files`` is False:
    the run folder cannot be written), then ``extra``."""
    from tdiag.monitor.sinks import ConsoleSink, JsonlSink, TensorBoardSink, WandbSink

    sinks: list[Any] = [JsonlSink()] if files else []
    if options.tensorboard and files:
        sinks.append(TensorBoardSink())
    if options.wandb is not None:
        sinks.append(WandbSink(**dict(options.wandb)))
    if options.console:
        sinks.append(ConsoleSink(total_steps=options.total_steps, quiet=options.quiet))
    return sinks + list(extra)
