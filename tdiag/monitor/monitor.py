"""The Monitor: two lines in a training loop, a run folder out (Contract 5 in DESIGN.md).

``step()`` on a non-log step does a handful of device ops (copy the loss — and the loop's
gradient norm, if given — into preallocated buffers) and one ``time.perf_counter()``; no
host sync. On a log step the gradient/update probe and (``watch="layers"``) the per-layer
hooks, armed just before that step, have left their values on the device; everything is
brought to the host at once (one ``tolist``; under torchrun one ``all_gather`` first),
turned into metrics, and written by the sinks (rank 0 only). The logic lives in
``metrics.py``, ``layers.py``, ``distributed.py``, ``recorder.py`` and ``runinfo.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdiag.history import HISTORY_FILE, META_FILE, write_json_atomic
from tdiag.monitor import alerts
from tdiag.monitor.alerts import NonFiniteError
from tdiag.monitor.cadence import PROBATION_CALLS, StepCadence, merge_calls
from tdiag.monitor.callbacks import CallbackAliases
from tdiag.monitor.config import MonitorConfig, build_sinks, infer_clip
from tdiag.monitor.distributed import rank_info
from tdiag.monitor.forwardsite import ForwardSite
from tdiag.monitor.guard import Guard, TrainingStopped
from tdiag.monitor.logstep import LogSteps, MicroBatchSteps
from tdiag.monitor.loopchecks import LoopWatch
from tdiag.monitor.metrics import (
    IntervalAccumulator,
    is_sharded,
)
from tdiag.monitor.probe import GradientProbe
from tdiag.monitor.recorder import FlightRecorder
from tdiag.monitor.runinfo import SignalFlag, build_meta, guarded, model_device, write_end_meta
from tdiag.monitor.sinks import MultiSink, NullSink, Sink
from tdiag.monitor.spikes import SpikeDetector
from tdiag.monitor.timing import ForwardTimer

__all__ = ["Monitor", "MonitorConfig", "NonFiniteError", "TrainingStopped"]

logger = logging.getLogger(__name__)

# After SIGTERM/SIGINT the report gets this long from the signal (torchrun and Slurm send
# SIGKILL 30 s after SIGTERM; the exit is held to ~5 s: history and meta.json come first).
SIGNAL_REPORT_BUDGET_S = 2.5


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Monitor(LogSteps, MicroBatchSteps, CallbackAliases):
    """Watch a training loop; write metrics, live Findings and a report into a run folder.

    Args:
        model: the model being trained (``nn.Module``; DDP/FSDP-wrapped is fine).
        optimizer: its optimizer (for LRs, the gradient norm and the update ratio).
        config: the run's config (a dict; stored in meta.json).
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, if any: its scale
            turns the end-of-backward gradient into the unscaled pre-clip norm.
        sinks: extra sinks (rank 0 only), besides those the options switch on.
        **options: see :class:`MonitorConfig` (``run_dir``, ``log_every``, ``watch`` …).

    Raises:
        ValueError/TypeError: an invalid option, naming the value.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        config: Any = None,
        scaler: Any = None,
        sinks: Sequence[Sink] = (),
        **options: Any,
    ) -> None:
        self.options = MonitorConfig(**options)
        self.model, self.optimizer, self.config = model, optimizer, config
        self.run_dir = Path(self.options.run_dir)
        self.rank = rank_info()
        self.clip = self.options.clip if self.options.clip is not None else infer_clip(config)
        self.device = model_device(model)
        # Files are written by rank 0, into a run folder it can write (else: one warning,
        # console/extra sinks only; training goes on) and no other live process writes
        # (else RunDirInUse, before any hook is attached).
        self._writes_files = self.rank.is_main and self._run_dir_writable()
        self._lock = self._take_lock() if self._writes_files else None
        self._step = 0
        self._closed = False
        self._warned_closed = False
        self._warned_no_grads = False
        self._skipped: bool | torch.Tensor | None = None
        self.status = "running"  # then completed | signal | exception | nonfinite
        self._restart_from: int | None = None  # set by load_state_dict (resume)
        self.end_detail: dict[str, str] = {}  # {"signal": "SIGTERM"} | {"exception": "T: msg"}
        self._alerted: set[str] = set()
        self.findings: list[Any] = []  # live Findings raised (on every rank)
        self.last_metrics: dict[str, float] = {}  # the last logged row (on every rank)
        self.tokens_total = 0.0
        self._acc = IntervalAccumulator(max(self.options.log_every, PROBATION_CALLS + 1))
        self._cadence = StepCadence()
        self._micro: list[tuple[Any, Any, float | None, float]] = []  # folded micro-batches
        self._probation_bwd: list[torch.Tensor] = []
        self.recorder = FlightRecorder(self.options.flight_recorder)
        self._names = {id(p): n for n, p in model.named_parameters()}
        layers = self.options.watch == "layers"
        self._probe = GradientProbe(
            optimizer,
            self._names,
            params=list(model.parameters()),
            update_ratio=self.options.update_ratio,
            per_tensor=layers,
            scaler=scaler,
        )
        self._probe.rolling = True  # until the step cadence is known (cadence.py)
        # Live loss spikes on the per-step losses, judged on the host at log steps (spikes.py)
        self._spikes = (
            SpikeDetector(
                window=self.options.spike_window,
                z=self.options.spike_z,
                rel=self.options.spike_rel,
            )
            if self.options.spikes
            else None
        )
        self._live_spikes = 0
        self._spike_replays = 0
        # The opt-in guard (guard.py): None unless on_nonfinite / on_spike is set. Its
        # optimizer hooks come after the probe's (the probe measures, then the guard decides).
        self._guard: Guard | None = None
        self._guard_keeper: Any = None  # rollback's snapshots when forensics keeps none
        self._stop_step: int | None = None
        if self.options.on_nonfinite is not None or self.options.on_spike is not None:
            self._guard = Guard(
                model,
                optimizer,
                on_nonfinite=self.options.on_nonfinite,
                on_spike=self.options.on_spike,
                keeper=self._snapshot_keeper,
            )
        # Forensics (tdiag/forensics): batches, RNG states and periodic off-device snapshots
        # kept for a replay of the first non-finite step; ``keeper`` is public for the guard.
        self.forensics: Any = None
        if self.options.forensics:
            from tdiag.forensics.live import LiveForensics

            self.forensics = LiveForensics(
                model,
                optimizer,
                loss_fn=self.options.loss_fn,
                snapshot_every=self.options.snapshot_every,
                clip=self.clip,
            )
        self.keeper = self.forensics.keeper if self.forensics is not None else None
        if self.keeper is None and "rollback" in (
            self.options.on_nonfinite,
            self.options.on_spike,
        ):  # rollback without forensics: the guard's own snapshots, at the same cadence
            from tdiag.forensics.keeper import Keeper

            self._guard_keeper = Keeper(snapshot_every=self.options.snapshot_every)
        self._batch: Any = None
        # The model's forward: the root's, or the children the loop calls (forwardsite.py)
        self._site = ForwardSite(model, self._on_forward)
        # Per-rank forward time (straggler naming) is needed under torchrun only.
        self._timer = (
            ForwardTimer(model, self.device, site=self._site) if self.rank.distributed else None
        )
        # Optimizer steps counted by a post-hook (a Python int, no device op): a step() that
        # saw none was skipped, e.g. by torch.amp.GradScaler after inf/NaN gradients.
        self._opt_steps = 0
        self._opt_steps_seen = 0
        self._opt_steps_at_log = 0
        self._opt_hook = None
        self._found_inf: torch.Tensor | None = None
        if optimizer is not None and hasattr(optimizer, "register_step_post_hook"):
            self._opt_hook = optimizer.register_step_post_hook(self._count_opt_step)
        self._watcher = None
        if layers:
            from tdiag.monitor.layers import LayerWatcher

            self._watcher = LayerWatcher(model, site=self._site)
        self._signals = SignalFlag()
        self._signal_step: int | None = None
        self._mfu = alerts.MfuMeter(self)
        self._sampler: Any = None
        self._await_forward = False
        self._t_return = time.perf_counter()
        self._forward_seen: float | None = None
        self._loop = LoopWatch(
            model,
            optimizer,
            self._names,
            clip=self.clip,
            ignore=self.options.ignore,
            distributed=self.rank.distributed,
            sharded=any(is_sharded(p) for p in model.parameters()),
        )
        self._loop.fingerprint_next = True  # step 1's input, for step 2's comparison
        self.sinks = MultiSink(
            build_sinks(self.options, sinks, files=self._writes_files)
            if self.rank.is_main
            else [NullSink()],
            background=True,  # TensorBoard, console, wandb off the training thread
        )
        self._open()

    # -- setup -----------------------------------------------------------------------------
    def _run_dir_writable(self) -> bool:
        probe = self.run_dir / f".tdiag-write-test-{os.getpid()}"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            logger.warning(
                "tdiag: cannot write to run_dir %s (%s: %s); no history, meta.json, TensorBoard "
                "files or report will be written for this run. Training goes on.",
                self.run_dir,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    def _take_lock(self) -> Any:
        """One writer per run folder (tdiag/runlock.py). Raises RunDirInUse when another
        live process writes it: refused before training starts, nothing lost."""
        from tdiag.runlock import acquire

        try:
            return acquire(self.run_dir)
        except OSError as exc:  # no lock file possible (odd filesystem): write unlocked
            logger.warning("tdiag: cannot lock %s (%s); writing it unlocked", self.run_dir, exc)
            return None

    def _open(self) -> None:
        meta = guarded(lambda: build_meta(monitor=self), "collecting run metadata") or {}
        self.meta = meta
        history = self.run_dir / HISTORY_FILE
        self._prior_history = (
            self._writes_files and history.is_file() and history.stat().st_size > 0
        )
        if self._writes_files:
            guarded(lambda: write_json_atomic(self.run_dir / META_FILE, meta), "writing meta.json")
        self.sinks.open(self.run_dir, meta)
        if self.options.system:
            from tdiag.monitor.system import SystemSampler

            self._sampler = guarded(
                lambda: SystemSampler(self.options.system_interval_s, self.device).start(),
                "starting the system sampler",
            )
        if self.options.handle_signals:
            self._signals.install()
        self._t_prev_log = time.perf_counter()
        self._arm()  # step 1 is a log step

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        # Data time: from the previous step() return to the first forward of the next step.
        if self._await_forward:
            self._forward_seen = time.perf_counter()
            self._await_forward = False
        if not self._mfu.input_seen:
            guarded(lambda: self._mfu.observe_forward(module, args, kwargs), "reading the input")
        if self.forensics is not None:
            self.forensics.on_forward(module)  # the step's RNG state, for the replay
        try:
            self._loop.on_forward(args, kwargs)
        except Exception as exc:  # a monitoring failure never stops training
            logger.warning("tdiag: loop checks disabled (%r)", exc)
            self._loop.enabled = False

    def _count_opt_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._opt_steps += 1
        # A fused optimizer is always called by GradScaler.step(), with an on-device
        # ``found_inf`` attribute set for the call, and skips the update itself when it is > 0.
        found_inf = getattr(optimizer, "found_inf", None)
        self._found_inf = found_inf.detach() if isinstance(found_inf, torch.Tensor) else None

    def _step_skipped(self) -> bool | torch.Tensor | None:
        """Did the optimizer skip this step? False/True from whether ``optimizer.step()`` ran
        since the last ``step()``, or the fused optimizer's ``found_inf`` tensor (read at the
        log step, no sync now). None when the Monitor cannot tell (no optimizer given)."""
        if self._opt_hook is None:
            return None
        skipped: bool | torch.Tensor = self._opt_steps == self._opt_steps_seen
        if self._guard is not None and self._guard.take_skipped():
            skipped = True  # the guard dropped this step's gradients (guard.py)
        if not skipped and self._found_inf is not None:
            skipped = self._found_inf
        self._found_inf = None
        self._opt_steps_seen = self._opt_steps
        return skipped

    def _is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.options.log_every == 0

    def _arm(self) -> None:
        self._probe.arm()
        self._loop.arm()
        if self._timer is not None:
            self._timer.arm()
        if self._watcher is not None:
            guarded(self._watcher.arm, "attaching the layer hooks")

    # -- the loop's calls ------------------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor | float | None,
        *,
        tokens: int | torch.Tensor | None = None,
        grad_norm: torch.Tensor | float | None = None,
        data_time: float | None = None,
        batch: Any = None,
    ) -> None:
        """Record one optimizer step. No host sync except on log steps (and every step with
        ``strict=True``).

        Args:
            loss: this step's loss (a tensor; not ``.item()``-ed) or a float.
            tokens: tokens processed this step on this rank (int or tensor).
            grad_norm: the global gradient norm before clipping, if the loop has it
                (``clip_grad_norm_`` returns it): taken instead of computing it again.
            data_time: seconds the loop spent fetching this step's batch (default: measured
                from the previous ``step()`` return to the model's next forward).
            batch: this step's batch, as ``loss_fn(model, batch)`` takes it (``forensics=True``:
                kept for a replay, tensors copied on the device, no host sync; else unused).

        Raises:
            NonFiniteError: with ``strict=True``, on a NaN/Inf loss or gradient norm.
            SystemExit: 143/130 on the second ``step()`` after SIGTERM/SIGINT (the loop did
                not stop on ``stop_requested``), after flushing and writing the report.
        """
        if self._stop_step is not None:  # the guard stopped the run; the loop went on
            self.close()
            raise TrainingStopped(
                f"tdiag stopped the run at step {self._stop_step} "
                f"({self._guard.stop_reason if self._guard else 'guard'}); the report is "
                "written. Check mon.should_stop after mon.step() to end the loop yourself."
            )
        if self._closed:
            self._warn_closed("step")
            return
        now = time.perf_counter()
        self._site.end_step()
        stepped = None if self._opt_hook is None else self._opt_steps != self._opt_steps_seen
        verdict = self._cadence.observe(stepped)
        if verdict == "regroup" and not self._micro_confirmed():
            verdict = self._cadence.reject()  # inf/NaN gradients: a scaler's skips
        if data_time is None and self._forward_seen is not None:
            data_time = self._forward_seen - self._t_return
        self._forward_seen = None
        self._batch = batch
        call = (loss, tokens, data_time, now - self._t_return)
        if verdict in ("fold", "close_prev") and not (verdict == "close_prev" and self._micro):
            self._micro.append(call)  # a micro-batch of an optimizer step (cadence.py)
            self._await_forward = True
            self._t_return = time.perf_counter()
            return
        if verdict == "close_prev":  # the kept calls were the step just taken
            call, self._micro = merge_calls(self._micro), [call]
        elif verdict == "close" and self._micro:
            call, self._micro = merge_calls([*self._micro, call]), []
        elif verdict == "regroup" and self._cadence.placement == "before":
            self._micro = [call]  # opens the next step; the deferred calls are regrouped
            call = None
        self._record(call, grad_norm, stepped, verdict)
        self._await_forward = True
        self._t_return = time.perf_counter()

    def _record(
        self, call: tuple | None, grad_norm: Any, stepped: bool | None, verdict: str
    ) -> None:
        """Record one step (``call`` = loss, tokens, data time, step time; None: only
        regroup what was recorded), then log and arm as the cadence says."""
        if call is not None:
            self._step += 1
            if self.forensics is not None:
                self.forensics.on_step(self._step, self._batch)
        loss, tokens, data_time, step_time = call if call is not None else (None,) * 4
        if self._step == 1 and self._prior_history:
            self._prior_history = False
            logger.warning(
                "tdiag: %s already has a history; this run appends to it with steps counted "
                "again from 1. To continue the step count, save mon.state_dict() with your "
                "checkpoint and call mon.load_state_dict() before the first step; or use a "
                "new run_dir.",
                self.run_dir,
            )
        self._skipped = self._step_skipped()
        if verdict == "defer" and stepped is False and "bwd_sq" in self._probe.values:
            self._probation_bwd.append(self._probe.values["bwd_sq"])
        try:
            if call is not None:
                self._acc.add(
                    loss,
                    tokens=tokens,
                    grad_norm=grad_norm,
                    data_time=data_time,
                    skipped=self._skipped,
                )
                self._acc.step_times.append(step_time)
        except Exception as exc:  # a monitoring failure never stops training
            logger.warning("tdiag: could not record step %d (%r)", self._step, exc)
        if call is not None:  # fingerprint the inputs of the two steps that end at a log step
            nxt = self._is_log_step(self._step + 1) or self._is_log_step(self._step + 2)
            self._loop.end_step(self._step, fingerprint_next=nxt)
        if verdict == "regroup":
            guarded(self._regroup, "counting micro-batches as optimizer steps")
        if verdict != "defer":
            self._probe.rolling = False
        if self._guard is not None and call is not None:
            guarded(lambda: self._guard_step(loss, grad_norm), "running the guard")
        if self.options.strict:
            self._strict_check(loss, grad_norm)
        if self._signals.signum is not None:
            self._on_signal()
        elif verdict == "defer":
            pass  # the first row waits until the step cadence is known (cadence.py)
        elif (
            verdict in ("flush", "regroup")
            or self._is_log_step(self._step)
            or self._acc.n >= self.options.log_every
        ):
            guarded(self._log_step, f"logging step {self._step}")
        if self._cadence.mode == "probation":
            if not self._probe.armed:
                self._arm()  # keep measuring every optimizer step until decided
        elif self._is_log_step(self._step + 1):
            self._arm()

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write extra metrics (e.g. ``{"val/loss": v}``) at ``step`` (default: the current
        step). Tensor values are read with ``float()`` (a host sync): call it on rare steps."""
        if self._closed:
            self._warn_closed("log")
            return
        row: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                row[str(key)] = float(value)  # host sync for tensor values
            except (TypeError, ValueError, RuntimeError):
                logger.warning(
                    "tdiag: mon.log() skipped %r: a metric must be a number or a one-element "
                    "tensor, got %s",
                    key,
                    type(value).__name__,
                )
        if not row:
            return
        at = self._step if step is None else int(step)
        if step is None and self._micro and self._opt_steps != self._opt_steps_seen:
            at += 1  # mon.step() before optimizer.step(): that step is recorded at the next call
        self.recorder.record(at, row)
        self.sinks.write(at, row)

    def _warn_no_grads(self) -> None:
        if not self._warned_no_grads:
            self._warned_no_grads = True
            logger.warning(
                "tdiag: no optimizer= was given and the parameters had no gradients at "
                "mon.step() (zero_grad ran before it?): train/grad_norm is not measured. Pass "
                "optimizer=opt, or grad_norm= to mon.step()."
            )

    def _warn_closed(self, what: str) -> None:
        if not self._warned_closed:
            self._warned_closed = True
            logger.warning(
                "tdiag: Monitor.%s() called after close(); ignored (the run is finished)", what
            )

    def close(self) -> None:
        """Flush the pending interval, close the sinks, update meta.json, build the report.

        After SIGTERM/SIGINT it then raises ``SystemExit(128 + signum)`` (143 / 130).
        Idempotent; never raises anything else.
        """
        if self._closed:
            return
        self._finish(None)
        code = self._signals.exit_code
        if code is not None:
            raise SystemExit(code)

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM/SIGINT was received: the loop should save and break."""
        return self._signals.signum is not None

    @property
    def should_stop(self) -> bool:
        """True once the loop should end: the guard stopped the run (``on_nonfinite`` /
        ``on_spike="stop"``), or SIGTERM/SIGINT was received (``stop_requested``)."""
        return self._stop_step is not None or self.stop_requested

    @property
    def guard_stopped(self) -> bool:
        """True once the guard stopped the run: the next ``step()`` raises TrainingStopped."""
        return self._stop_step is not None

    @property
    def guard_events(self) -> list[dict[str, Any]]:
        """What the guard did: ``[{"trigger", "action", "step", …}]`` (empty without one)."""
        return [e.to_dict() for e in self._guard.events] if self._guard is not None else []

    def _snapshot_keeper(self) -> Any:
        """The keeper whose snapshots a rollback restores: forensics' when it keeps one,
        else the guard's own (snapshots only)."""
        keeper = getattr(self, "keeper", None)  # set after the guard is made
        return keeper if keeper is not None else self._guard_keeper

    @property
    def perf_info(self) -> dict[str, Any]:
        """FLOPs per token, peak FLOP/s and its source, or why there is no MFU."""
        return self._mfu.to_meta()

    @property
    def global_step(self) -> int:
        """Steps recorded so far (the ``step`` of the last history row logged by ``step()``)."""
        return self._step

    # -- shutdown --------------------------------------------------------------------------
    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        guarded(self._flush_micro, "recording the last micro-batches")
        self._closed = True
        if self._acc.n:
            guarded(lambda: self._log_step(final=True), "flushing the last interval")
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            exc = None  # sys.exit(0) inside the block is a normal end, not a crash
        if exc is not None:
            self.status = "exception"
            self.end_detail = {"exception": f"{type(exc).__name__}: {exc}"[:500]}
            if self._writes_files:
                detail = f"{type(exc).__name__}: {exc}"
                guarded(
                    lambda: self.recorder.dump(
                        self.run_dir, reason="exception", step=self._step, detail=detail
                    ),
                    "writing the flight recorder",
                )
        elif self._signals.signum is not None:
            self.status = "signal"
            self.end_detail = {"signal": _signal_name(self._signals.signum)}
        elif self.status == "running":
            self.status = "completed"
        if exc is None and self._signals.signum is None:  # one host sync (logstep.py)
            guarded(self._check_at_close, "checking the weights at close")
        if self._watcher is not None:
            self._watcher.disarm()
        self._probe.remove()
        if self.forensics is not None:
            self.forensics.close()
        if self._guard is not None:
            self._guard.remove()
            if self._guard.events:
                self.end_detail["guard"] = "; ".join(
                    f"{e.action} at step {e.step} ({e.trigger})" for e in self._guard.events
                )[:500]
        if self._timer is not None:
            self._timer.remove()
        self._site.remove()
        if self._opt_hook is not None:
            self._opt_hook.remove()
        if self._sampler is not None:
            guarded(self._sampler.stop, "stopping the system sampler")
        self._tell_console_outcome()
        # After a signal the background sinks get 1 s to drain (history.jsonl is written
        # on this thread, already complete): the exit stays within its ~5 s.
        self.sinks.close(timeout=None if self._signals.received_at is None else 1.0)
        if self._writes_files:
            guarded(lambda: write_end_meta(self), "updating meta.json")
            if self.options.report:
                deadline = None
                if self._signals.received_at is not None:  # out before the SIGKILL
                    deadline = self._signals.received_at + SIGNAL_REPORT_BUDGET_S
                built = alerts.build_report_safely(
                    self.run_dir, self._summary_console(), deadline=deadline
                )
                if deadline is not None and not built:
                    self.end_detail["report"] = (
                        f"incomplete: not built within {SIGNAL_REPORT_BUDGET_S:g} s of the "
                        "signal (a background process goes on with it, see report.log); "
                        f"`tdiag report {self.run_dir}` builds it"
                    )
                    guarded(lambda: write_end_meta(self), "updating meta.json")
        self._signals.restore()
        if self._lock is not None:
            self._lock.release()

    # -- context manager, callback aliases, resume -----------------------------------------
    def _tell_console_outcome(self) -> None:
        """The console's last line says how the run ended, not just "done"."""
        from tdiag.monitor.sinks import ConsoleSink

        detail = self.end_detail
        outcome = {
            "signal": f"terminated by {detail.get('signal', 'a signal')}",
            "exception": f"failed with {detail.get('exception', 'an exception')}",
            "nonfinite": "done, with non-finite values (see the findings)",
        }.get(self.status, "done")
        for sink in self.sinks.sinks:
            if isinstance(sink, ConsoleSink):
                sink.outcome = outcome

    def _summary_console(self) -> Any:
        """The live console's rich Console, for the report's summary (None when quiet/off)."""
        from tdiag.monitor.sinks import ConsoleSink

        for sink in self.sinks.sinks:
            if isinstance(sink, ConsoleSink) and not sink.quiet:
                return sink.console
        return None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
            return
        self._finish(exc)
        code = self._signals.exit_code
        if exc is None and code is not None:
            raise SystemExit(code)
