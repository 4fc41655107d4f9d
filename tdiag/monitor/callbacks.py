"""The Monitor's outward protocols: callback aliases and ``state_dict`` for resume.

Callbacks: ``on_train_start/on_step_end/on_eval/on_train_end``.

Trainers (and tdiag's integrations) call these with a ``state`` object carrying ``loss``,
``tokens``, ``grad_norm``, ``data_time``, ``step``, ``val_loss`` and ``should_stop``
(the reference training loop's TrainState); the Monitor reads state and only ever sets
``state.should_stop`` (after SIGTERM/SIGINT).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CallbackAliases"]


class CallbackAliases:
    """Mixin of :class:`tdiag.monitor.Monitor`: callback names mapped to its methods, and
    its resumable state (the attributes below belong to the Monitor)."""

    stop_requested: bool

    def step(self, loss: Any, **kwargs: Any) -> None:  # provided by the Monitor
        raise NotImplementedError

    def log(self, metrics: Any, step: int | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def on_train_start(self, state: Any = None) -> None:
        """Callback alias: the Monitor is already open (nothing to do)."""

    def on_step_end(self, state: Any) -> None:
        """Callback alias of :meth:`step` reading ``state.loss/tokens/grad_norm/data_time``."""
        self.step(
            state.loss,
            tokens=getattr(state, "tokens", None),
            grad_norm=getattr(state, "grad_norm", None),
            data_time=getattr(state, "data_time", None),
        )
        if self.stop_requested and hasattr(state, "should_stop"):
            state.should_stop = True

    def on_eval(self, state: Any) -> None:
        """Callback alias: logs ``state.val_loss`` as ``val/loss``."""
        if getattr(state, "val_loss", None) is not None:
            self.log({"val/loss": state.val_loss}, step=getattr(state, "step", None))

    def on_train_end(self, state: Any = None) -> None:
        """Callback alias of :meth:`close`."""
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's resumable state (step, tokens, alerts raised, flight recorder).
        Steps of an unfinished log interval are not part of it."""
        return {
            "version": 1,
            "step": self._step,
            "tokens_total": self.tokens_total,
            "alerted": sorted(self._alerted),
            "recorder": self.recorder.state_dict(),
            "cadence": self._cadence.state_dict(),
            "spikes": self._spikes.state_dict() if self._spikes is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (call before the first ``step()`` of the resumed run)."""
        if state.get("version") != 1:
            raise ValueError(f"unknown Monitor state version {state.get('version')!r}")
        self._step = int(state["step"])
        self._restart_from = self._step  # the history's restart marker, with the next row
        self.tokens_total = float(state.get("tokens_total", 0.0))
        self._alerted = set(state.get("alerted", []))
        self.recorder.load_state_dict(state.get("recorder", {}))
        self._cadence.load_state_dict(state.get("cadence", {}))
        if self._spikes is not None:  # the trailing window of per-step losses (spikes.py)
            self._spikes.load_state_dict(state.get("spikes", {}))
        self._probe.rolling = False
        self._acc.reset()
        if not self._is_log_step(self._step + 1):
            self._probe.disarm()
            if self._timer is not None:
                self._timer.disarm()
            if self._watcher is not None:
                self._watcher.disarm()
