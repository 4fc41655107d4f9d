"""The Monitor's log step (one host transfer, metrics, live checks) and its handling of
``step()`` called per micro-batch: mixins of :class:`tdiag.monitor.Monitor`, split out of
monitor.py to keep it one screen per concern. They use the Monitor's own attributes (they
are the same object); the logic itself lives in metrics.py, probe.py, loopchecks.py,
cadence.py and distributed.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from tdiag.monitor import alerts
from tdiag.monitor.alerts import NonFiniteError
from tdiag.monitor.cadence import merge_calls, micro_batch_warning
from tdiag.monitor.distributed import gather_rows, step_time_metrics
from tdiag.monitor.metrics import DeviceBatch, is_sharded, learning_rates, summarize_interval
from tdiag.monitor.runinfo import guarded
from tdiag.monitor.spikes import (
    MAX_LIVE_SPIKES,
    MAX_SPIKE_REPLAYS,
    loss_max,
    spike_finding,
    spike_forensics,
)
from tdiag.monitor.system import cuda_memory_stats

__all__ = ["LogSteps", "MicroBatchSteps"]

logger = logging.getLogger("tdiag.monitor.monitor")

# Metrics of the probed (log) step's gradients/update: meaningless when it was skipped.
_PROBED_STEP_KEYS = ("train/grad_norm", "train/update_ratio", "grad_norm/")


class LogSteps:
    """Bring the interval to the host (one sync), compute, write, run the live checks."""

    # Attributes of the Monitor these methods use (declared for readers and type checkers).
    _acc: Any
    _probe: Any
    _loop: Any
    _timer: Any
    _watcher: Any
    _step: int
    forensics: Any  # tdiag.forensics.live.LiveForensics, or None

    # -- log steps -------------------------------------------------------------------------
    def _log_step(self, *, final: bool = False) -> dict[str, float]:
        """Bring the interval to the host (one sync), compute, write, check for NaN/Inf.
        ``final``: a flush at close/signal/strict stop, without a collective."""
        n = self._acc.n
        if n == 0:
            return {}
        first_step = self._step - n + 1
        collective = self.rank.distributed and not final
        try:
            host, layout, mem, elapsed, probed = self._gather(n, collective)
            summary = self._acc.summary(host)
            metrics = self._interval_metrics(host, summary, layout, mem, elapsed, probed)
        finally:  # even if something failed: a fresh interval, no hook left attached
            self._acc.reset()
            self._probe.disarm()
            if self._timer is not None:
                self._timer.disarm()
            if self._watcher is not None:
                self._watcher.disarm()
            self._loop.disarm()
        for i in range(n):
            self.recorder.record(first_step + i, alerts.step_row(summary, i))
        self.recorder.record(self._step, metrics)
        if self._restart_from is not None:
            # A resumed run: its first row is preceded by a marker at the first replayed
            # step, so that the history shows the restart and the reader lets the resumed
            # rows win from there (the earlier run's rows up to the checkpoint stay).
            marker = {"run/restart": float(self._restart_from)}
            self.sinks.write(min(self._restart_from + 1, first_step), marker)
            self._restart_from = None
        self.sinks.write(self._step, metrics)
        self.last_metrics = metrics
        where = self._watcher.first_nonfinite_module(host, layout) if layout else None
        nonfinite = self._check_nonfinite(summary, metrics, first_step, where)
        spiked = False
        if self._spikes is not None:
            spiked = bool(
                guarded(lambda: self._check_spikes(summary, first_step), "detecting loss spikes")
            )
        healthy = not spiked and not nonfinite
        if self.forensics is not None and healthy:  # a snapshot when due (tdiag/forensics)
            self.forensics.after_log(self._step)
        if self._guard_keeper is not None and healthy:
            guarded(  # rollback's snapshot, at a healthy log step (guard.py)
                lambda: self._guard_keeper.maybe_snapshot(self._step, self.model, self.optimizer),
                "snapshotting for the guard",
            )
        self._raise(
            self._loop.check(
                step=self._step,
                host=host,
                metrics=metrics,
                steps_in_interval=n,
                optimizer_steps=probed["opt_steps"],
                probed_skipped=bool(summary.skipped and summary.skipped[-1]),
                update_names=probed["update_names"],
                update_groups=probed["update_groups"],
            )
        )
        return metrics

    def _raise(self, findings: list[Any]) -> None:
        """Live Findings of the loop checks (loopchecks.py): to the sinks and the console."""
        for f in findings:
            self.findings.append(f)
            self.sinks.event(f)

    def _gather(self, n: int, collective: bool) -> tuple[dict[str, Any], Any, dict, float, dict]:
        batch = DeviceBatch()
        self._acc.add_to(batch)
        if (
            self._probe.armed
            and not self._probe.done
            and self._probe.enabled
            and self._skipped is not True  # a skipped step's gradients are inf/NaN by design
        ):
            self._probe.measure_grads(list(self.model.parameters()))  # no optimizer hook fired
            if not self._probe.done and self.optimizer is None and not self._acc.has_grad_norms:
                self._warn_no_grads()
        self._probe.add_to(batch)
        self._loop.add_to(batch, self._step)
        layout = self._watcher.add_to(batch) if self._watcher and self._watcher.armed else None
        local_elapsed = time.perf_counter() - self._t_prev_log
        batch.add("host/step_time", local_elapsed / n, "all")
        if self.rank.distributed:  # per-rank own time, to name a straggler (timing.py)
            data = self._acc.data_times
            batch.add("host/data_time", math.fsum(data) / len(data) if data else math.nan, "all")
            compute = guarded(self._timer.seconds, "timing the forward") if self._timer else None
            batch.add("host/compute_time", math.nan if compute is None else compute, "all")
        batch.add("host/tokens", float(self._acc.tokens), "sum")
        mem = guarded(lambda: cuda_memory_stats(self.device), "reading CUDA memory") or {}
        for key, value in mem.items():
            batch.add(key, value, "max")
        rows = (
            gather_rows(batch.pack(with_host=True), self.rank)
            if collective
            else [batch.pack().tolist()]  # host sync (the one per log step)
        )
        host = batch.unpack(rows, with_host=collective)
        now = time.perf_counter()
        elapsed, self._t_prev_log = now - self._t_prev_log, now
        if self._watcher is not None:
            self._watcher.disarm()
        probed = {
            "names": self._probe.tensor_names,
            "scale": self._probe.scale,
            "lr": guarded(self._probe.lr_metrics, "reading the LR"),
            "update_names": self._probe.update_names,
            "update_groups": self._probe.update_groups,
            "opt_steps": None
            if self._opt_hook is None
            else self._opt_steps - self._opt_steps_at_log,
        }
        self._opt_steps_at_log = self._opt_steps
        self._probe.disarm()
        self._probe.reset()
        return host, layout, mem, elapsed, probed

    def _interval_metrics(
        self, host: dict, summary: Any, layout: Any, mem: dict, elapsed: float, probed: dict
    ) -> dict[str, float]:
        tokens = host["host/tokens"][0] + sum(host.get("acc/tokens", [0.0]))
        self.tokens_total += tokens
        metrics = self._probe.metrics(host, probed["names"], scale=probed["scale"])
        if summary.skipped and summary.skipped[-1]:  # the probed step was skipped (GradScaler)
            metrics = {k: v for k, v in metrics.items() if not k.startswith(_PROBED_STEP_KEYS)}
        metrics.update(summarize_interval(summary, clip=self.clip, tokens=tokens, elapsed=elapsed))
        peak = loss_max(summary.losses)  # the interval's worst step (a spike the mean hides)
        if peak is not None:
            metrics["train/loss_max"] = peak
        metrics["train/tokens"] = self.tokens_total
        # The LR the probed step used (read in its pre-hook: a scheduler steps after it);
        # without an optimizer step seen, the optimizer's current LR.
        lrs = probed["lr"]
        if lrs is None:
            lrs = guarded(lambda: learning_rates(self.optimizer), "reading the LR") or {}
        metrics.update(lrs)
        if layout is not None:
            metrics.update(self._watcher.metrics(host, layout))
        metrics.update(self._mfu.metrics(metrics.get("perf/tokens_per_sec"), self.rank.world_size))
        self._t_prev_log += self._mfu.setup_seconds  # the one-time FLOP/peak set-up is not a step
        self._mfu.setup_seconds = 0.0
        metrics.update({k: host[k][0] for k in mem})
        if self._sampler is not None:
            metrics.update(guarded(self._sampler.latest, "reading system metrics") or {})
        metrics.update(
            step_time_metrics(
                [r[0] for r in host["host/step_time"]],
                data=[r[0] for r in host["host/data_time"]] if "host/data_time" in host else None,
                compute=(
                    [r[0] for r in host["host/compute_time"]]
                    if "host/compute_time" in host
                    else None
                ),
            )
        )
        return metrics

    # -- live detection --------------------------------------------------------------------
    def _check_nonfinite(
        self, summary: Any, metrics: Mapping[str, float], first: int, where: str | None
    ) -> bool:
        """Raise the live NaN/Inf Findings of this interval (new ids only). Returns whether
        the interval had a non-finite loss or gradient norm at all (raised before or now)."""
        found = alerts.nonfinite_findings(summary, metrics, first, self._step, where)
        findings = [f for f in found if f.id not in self._alerted]
        if not findings:
            return bool(found)
        if where is None:
            where = guarded(lambda: alerts.first_nonfinite_param(self.model), "locating NaN")
            findings = [f if f.where else alerts.with_where(f, where) for f in findings]
        guard = self._guard
        # the guard may restore a healthy state (a rollback now, or its pre-hook did): then
        # forensics go on keeping, for a later episode
        recovering = guard is not None and guard.on_nonfinite in ("skip", "rollback")
        if self.forensics is not None:  # replay the non-finite step (once per episode)
            findings = self.forensics.explain(findings, self._step, recovering=recovering)
        for f in findings:
            self._alerted.add(f.id)
            self.findings.append(f)
            self.sinks.event(f)
        self.status = "nonfinite"
        if guard is not None:  # a NaN the guard's pre-hook did not see (e.g. the loss)
            event = guard.on_alert(findings[0].id, int(findings[0].step or self._step))
            if self.forensics is not None and recovering:
                if event is not None and event.action == "rollback":
                    self.forensics.recovered(self._step)
                elif event is not None:  # not restored (no snapshot, or found too late)
                    self.forensics.poisoned()
            self._note_guard_stop()
        if self._writes_files:
            guarded(
                lambda: self.recorder.dump(
                    self.run_dir, reason=findings[0].id, step=findings[0].step
                ),
                "writing the flight recorder",
            )
        return True

    def _check_at_close(self) -> None:
        """At close, once: are the weights and gradients finite? A gradient that went NaN/Inf
        at the last step, when it is not a log step, leaves a finite loss and no measured
        gradient norm: only the weights (after its update) or the gradients still held show
        it. One host sync; on a NaN, the live ``train.nonfinite-grad`` and (forensics) the
        replay, as at a log step. Not after a NaN already raised that nothing repaired (the
        guard's skip/rollback does), nor on a sharded model (a norm of a sharded tensor is a
        collective that only this rank would enter)."""
        from tdiag.monitor.guard import state_finite

        repaired = self._guard is not None and self._guard.on_nonfinite in ("skip", "rollback")
        raised = {"train.nonfinite-loss", "train.nonfinite-grad"} & self._alerted
        if self._step == 0 or (raised and not repaired):
            return
        if any(is_sharded(p) for p in self.model.parameters()):
            return
        # the last step skipped by a GradScaler: inf/NaN in its gradients are the scaler's
        grads = self._skipped is not True
        if state_finite(self.model, grads=grads):
            return
        where = guarded(lambda: alerts.first_nonfinite_param(self.model), "locating NaN")
        finding = alerts.close_nonfinite_finding(self._step, where, grads=grads)
        if self.forensics is not None:
            finding = self.forensics.explain([finding], self._step)[0]
        self._alerted.add(finding.id)
        self.findings.append(finding)
        self.sinks.event(finding)
        self.status = "nonfinite"
        if self._writes_files:
            guarded(
                lambda: self.recorder.dump(self.run_dir, reason=finding.id, step=finding.step),
                "writing the flight recorder",
            )

    # -- loss spikes and the guard (spikes.py, guard.py) -------------------------------------
    def _check_spikes(self, summary: Any, first: int) -> bool:
        """Judge the interval's per-step losses (host values of this log step's one sync);
        raise a live ``train.loss-spikes`` per new episode. Returns whether one was found."""
        found = self._spikes.observe(first, summary.losses)
        for spike in found:
            if self.forensics is not None:  # before any rollback: replay from the snapshot
                guarded(lambda s=spike: self._replay_spike(s), "replaying the loss spike")
            if self._guard is not None:
                event = self._guard.on_alert(
                    "train.loss-spikes", self._step, before=spike.first_step
                )
                if event is not None:
                    spike.action = event.action
                    event.detail["spike_step"] = spike.first_step
            f = spike_finding(spike, self._spikes, interval=(first, self._step))
            self._live_spikes += 1
            if self._live_spikes <= MAX_LIVE_SPIKES:
                self.findings.append(f)
                self.sinks.event(f)
            elif self._live_spikes == MAX_LIVE_SPIKES + 1:
                logger.warning(
                    "tdiag: more than %d loss spikes; later ones are not raised live",
                    MAX_LIVE_SPIKES,
                )
        if found:
            self._note_guard_stop()
        return bool(found)

    def _replay_spike(self, spike: Any) -> None:
        """Replay the spike (forensics, ``kind="spike"``) from the last snapshot in a scratch
        copy: did the batch or the state cause it, and which module moved first. At most
        :data:`MAX_SPIKE_REPLAYS` per run (each costs the steps since the snapshot + 4
        forward/backward passes, once)."""
        from tdiag.forensics.replay import replay

        fx = self.forensics
        if fx.loss_fn is None or not fx.keeper.enabled or self._spike_replays >= MAX_SPIKE_REPLAYS:
            return
        self._spike_replays += 1
        det = self._spikes
        result = replay(
            fx.keeper,
            self.model,
            self.optimizer,
            fx.loss_fn,
            until_step=spike.steps[-1],
            kind="spike",
            threshold=spike.baseline + max(det.z * spike.sigma, det.rel * abs(spike.baseline)),
            clip=fx.clip,
            detach=fx.detach,
        )
        spike.forensics = spike_forensics(result)

    def _guard_step(self, loss: Any, grad_norm: Any) -> None:
        """After the step was recorded: name the step of the guard's pre-hook decision, raise
        its Finding, and (``stop``) end the interval now. Without a pre-hook check this step
        (no optimizer, or its step was not seen), ``on_nonfinite`` checks the loss and the
        loop's gradient norm here: one host sync. Not on a step the optimizer skipped (a
        GradScaler's: inf/NaN there is the scaler's business)."""
        from tdiag.monitor.guard import guard_finding

        guard = self._guard
        checked = guard.checked_this_step
        event = guard.take_pending(self._step)
        if event is not None:
            f = guard_finding(event)
            # the live state stays healthy after a skip or a rollback: forensics go on keeping
            recovering = event.action in ("skip", "rollback")
            if self.forensics is not None:  # replay the step the guard caught (per episode)
                f = (
                    guarded(
                        lambda: self.forensics.explain([f], self._step, recovering=recovering),
                        "replaying",
                    )
                    or [f]
                )[0]
            self._alerted.add(f.id)
            self.findings.append(f)
            self.sinks.event(f)
            self.status = "nonfinite"
            guard.settle(self._step)  # after the replay: it starts from the old snapshot
            if self.forensics is not None and recovering:
                self.forensics.recovered(self._step)
        elif not checked and guard.on_nonfinite is not None and self._skipped is not True:
            flags = [
                torch.isfinite(v.detach().float()).all().reshape(())
                for v in (loss, grad_norm)
                if isinstance(v, torch.Tensor)
            ]
            host_bad = [
                v for v in (loss, grad_norm) if isinstance(v, int | float) and not math.isfinite(v)
            ]
            dev = flags[0].device if flags else None
            bad = bool(host_bad) or (
                bool(flags) and not bool(torch.stack([f.to(dev) for f in flags]).all())
            )  # host sync (guard without a pre-hook check: once per step)
            if bad:
                guard.on_alert("train.nonfinite-loss", self._step)
        if guard.should_stop and self._stop_step is None:
            guarded(lambda: self._log_step(final=True), "logging the stopped step")
            self._note_guard_stop()

    def _note_guard_stop(self) -> None:
        if self._guard is not None and self._guard.should_stop and self._stop_step is None:
            self._stop_step = self._step

    def _strict_check(self, loss: Any, grad_norm: Any) -> None:
        skipped = self._skipped
        if skipped is True:  # the optimizer skipped the step: inf/NaN grads are the scaler's
            grad_norm = None
        flags = []
        for value in (loss, grad_norm):
            if isinstance(value, torch.Tensor):
                flags.append(torch.isfinite(value.detach().float().sum()).reshape(()))
            elif value is not None:
                flags.append(torch.tensor(math.isfinite(float(value))))
        if not flags:
            return
        if isinstance(skipped, torch.Tensor) and isinstance(grad_norm, torch.Tensor):
            flags[-1] = flags[-1] | (skipped.to(flags[-1].device).reshape(()) > 0)
        dev = flags[0].device
        if bool(torch.stack([f.to(dev) for f in flags]).all()):  # host sync (strict: per step)
            return
        metrics = guarded(lambda: self._log_step(final=True), "logging the non-finite step") or {}
        self._finish(None)
        raise NonFiniteError(
            f"non-finite loss or gradient norm at step {self._step} (strict=True): "
            f"loss={metrics.get('train/loss_last')}, grad_norm={metrics.get('train/grad_norm')}"
        )

    def _on_signal(self) -> None:
        if self._signal_step is None:
            self._signal_step = self._step
            logger.warning(
                "tdiag: signal %s received; flushing (stop_requested is set)", self._signals.signum
            )
            guarded(lambda: self._log_step(final=True), "flushing after a signal")
            return
        self.close()  # the loop went on: finish and exit with 128 + signum


class MicroBatchSteps:
    """``mon.step()`` called once per micro-batch (cadence.py): folding and regrouping."""

    _micro: list
    _cadence: Any
    _acc: Any
    _step: int

    # -- micro-batches (cadence.py) --------------------------------------------------------
    def _flush_micro(self) -> None:
        """At close: the kept micro-batch calls of a ``"before"`` loop whose optimizer step
        ran after the last ``step()`` are that last step."""
        if (
            self._micro
            and self._cadence.placement == "before"
            and self._opt_hook is not None
            and self._opt_steps != self._opt_steps_seen
        ):
            call, self._micro = merge_calls(self._micro), []
            self._record(call, None, True, "record")
        self._micro = []

    def _micro_confirmed(self) -> bool:
        """Micro-batches, not a scaler's skips: no call without a step had inf/NaN gradients."""
        flags, self._probation_bwd = self._probation_bwd, []
        if not flags:
            return True
        dev = flags[0].device
        return bool(
            torch.stack([f.to(dev).reshape(()) for f in flags]).isfinite().all()
        )  # host sync (once)

    def _regroup(self) -> None:
        groups = self._cadence.groups
        self._acc.regroup(groups)
        self._step = len(groups)
        logger.warning(micro_batch_warning(self._cadence.period))
