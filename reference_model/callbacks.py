"""Observers of the reference trainer, plugged in as callbacks: a plain progress line, the
demo's progress bar, and tdiag's Monitor (attached from outside, as a user would attach it:
the only place where the reference model meets tdiag, imported lazily)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig
from .step import step_loss

if TYPE_CHECKING:
    from .train import TrainState

logger = logging.getLogger(__name__)


class PaddingMeter:
    """Mean padding fraction of the steps since the last ``take()`` (host floats only)."""

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, fraction: float) -> None:
        self.total, self.n = self.total + fraction, self.n + 1

    def take(self) -> float:
        mean = self.total / self.n if self.n else 0.0
        self.total, self.n = 0.0, 0
        return mean


class ProgressLine:
    """Fallback observer without tdiag's Monitor: one line per log interval (rank 0)."""

    def __init__(self, *, log_every: int, total: int, console: Any = None) -> None:
        from rich.console import Console

        self.log_every, self.total = log_every, total
        self.console = console or Console(stderr=True)
        self._t = time.perf_counter()
        self._tokens = 0
        self._padding = PaddingMeter()

    def on_step_end(self, state: TrainState) -> None:
        self._tokens += state.tokens
        self._padding.add(state.padding_frac)
        if state.rank != 0 or state.step % self.log_every:
            return
        dt = time.perf_counter() - self._t
        loss = state.loss.item() if state.loss is not None else float("nan")  # host sync (log step)
        padding = self._padding.take()
        pad = f"  pad {padding:.1%}" if state.config.batching == "documents" else ""
        self.console.print(
            f"step {state.step:>6}/{self.total}  loss {loss:.4f}  lr {state.lr:.2e}  "
            f"tok/s {self._tokens * state.world_size / max(dt, 1e-9):,.0f}{pad}"
        )
        self._t, self._tokens = time.perf_counter(), 0

    def on_eval(self, state: TrainState) -> None:
        if state.rank == 0:
            self.console.print(f"step {state.step:>6}  val/loss {state.val_loss:.4f}")


class MonitorCallback:
    """Drives a tdiag Monitor from the training loop, exactly as a user's own loop would.

    The Monitor needs the model and optimizer, which ``train()`` builds: ``make_monitor(state)``
    constructs it at ``on_train_start``. Use the callback as a context manager around
    ``train()`` so that a crash still closes the Monitor (flushes, writes the report).
    """

    def __init__(self, make_monitor: Callable[[TrainState], Any]) -> None:
        self.make_monitor = make_monitor
        self.mon: Any = None
        self._padding = PaddingMeter()

    def on_train_start(self, state: TrainState) -> None:
        self.mon = self.make_monitor(state)
        if state.step > 0:  # resumed: count on from the trainer's step (a checkpoint without
            # the Monitor's state; load_state_dict below restores the rest when it has it)
            self.mon.load_state_dict({"version": 1, "step": state.step, "tokens_total": 0.0})

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state, saved in the trainer's checkpoint."""
        return self.mon.state_dict() if self.mon is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mon is not None and state:
            self.mon.load_state_dict(state)

    def on_step_end(self, state: TrainState) -> None:
        self.mon.step(
            state.loss,
            tokens=state.tokens,
            grad_norm=state.grad_norm,
            data_time=state.data_time,
            batch=state.batch,  # kept for a replay with forensics=True; else unused
        )
        if state.config.batching == "documents":
            # data/padding_frac: mean fraction of input positions that were padding over the
            # steps since the last log step (a host float: no sync).
            self._padding.add(state.padding_frac)
            if state.step == 1 or state.step % state.config.log_every == 0:
                self.mon.log({"data/padding_frac": self._padding.take()}, step=state.step)
        if self.mon.stop_requested:  # SIGTERM/SIGINT: stop, checkpoint, report
            state.should_stop = True

    def on_eval(self, state: TrainState) -> None:
        self.mon.log({"val/loss": state.val_loss}, step=state.step)

    def on_train_end(self, state: TrainState) -> None:
        self.mon.close()

    def __enter__(self) -> MonitorCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.mon is not None and exc is not None:
            self.mon.__exit__(exc_type, exc, tb)


def attach_monitor(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    quiet: bool,
    watch: str | None = None,
    forensics: bool = False,
) -> MonitorCallback | None:
    """tdiag's Monitor as a callback, or None when tdiag.monitor is not importable.
    ``forensics``: replay the first NaN/Inf step (its loss_fn is ``step.step_loss``)."""
    try:
        from tdiag import Monitor
    except ImportError as e:
        logger.info("tdiag Monitor not available (%s): plain progress output", e)
        return None

    def make_monitor(state: TrainState) -> Any:
        return Monitor(
            state.model,
            optimizer=state.optimizer,
            scaler=state.scaler,
            run_dir=run_dir,
            log_every=cfg.log_every,
            total_steps=cfg.steps,
            config=asdict(cfg),
            seq_len=cfg.train_seq_len,
            watch=watch,
            quiet=quiet,
            forensics=forensics,
            loss_fn=partial(
                step_loss,
                causal=cfg.model.causal,
                precision=cfg.precision,
                label_smoothing=cfg.label_smoothing,
            )
            if forensics
            else None,
        )

    return MonitorCallback(make_monitor)


class DemoProgress:
    """A rich progress bar with loss and tokens/s (used until tdiag's Monitor is available)."""

    def __init__(self, total: int, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total, info="")
        self._t, self._tokens = time.perf_counter(), 0

    def on_train_start(self, state: TrainState) -> None:
        self.progress.start()

    def on_step_end(self, state: TrainState) -> None:
        self._tokens += state.tokens
        self.progress.update(self.task, completed=state.step)
        if state.step % state.config.log_every == 0:
            loss = state.loss.item()  # host sync (log step)
            tps = self._tokens / max(time.perf_counter() - self._t, 1e-9)
            self.progress.update(self.task, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")
            self._t, self._tokens = time.perf_counter(), 0

    def on_eval(self, state: TrainState) -> None:
        self.progress.console.print(f"step {state.step}: val/loss {state.val_loss:.3f}")

    def on_train_end(self, state: TrainState) -> None:
        self.progress.stop()
