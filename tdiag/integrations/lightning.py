"""Lightning adapter: the Monitor as a ``lightning.pytorch.Callback``.

    from tdiag.integrations.lightning import TdiagLightningCallback
    trainer = L.Trainer(..., callbacks=[TdiagLightningCallback(run_dir="reports/pl")])

The training step's returned loss (a tensor, or ``{"loss": tensor}``) is passed to the
Monitor once per optimizer step (micro-batches of gradient accumulation are averaged on
the device); ``val_loss`` / ``val/loss`` from ``trainer.callback_metrics`` goes to
``val/loss``. After SIGTERM/SIGINT, or when the opt-in guard stops the run
(``on_nonfinite=``/``on_spike="stop"``), it sets ``trainer.should_stop``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from tdiag.integrations._report_line import print_report_line

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on which Lightning is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "tdiag.integrations.lightning needs Lightning: pip install 'tdiag[lightning]'"
        ) from exc

__all__ = ["TdiagLightningCallback", "training_step_loss"]

logger = logging.getLogger(__name__)

_VAL_KEYS = ("val/loss", "val_loss", "validation_loss")


def _loss_from(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) else None


def _tokens_from(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    elif isinstance(batch, tuple | list) and batch:
        batch = batch[0]
    return int(batch.numel()) if isinstance(batch, torch.Tensor) else 0


def training_step_loss(model: Any, batch: Any) -> Any:
    """``loss_fn`` for forensics: the module's own ``training_step(batch, 0)`` loss, run on
    the replay's scratch copy (whose trainer reference is None: its ``self.log`` calls are
    dropped, and Lightning's warning about them silenced)."""
    from tdiag.forensics import loss_of

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")
        return loss_of(model.training_step(batch, 0))


class TdiagLightningCallback(Callback):
    """Run a :class:`tdiag.Monitor` inside a Lightning Trainer (rank 0 writes)."""

    def __init__(
        self, run_dir: str = "reports/lightning", log_every: int = 10, **monitor_options: Any
    ):
        super().__init__()
        self.run_dir, self.log_every, self.monitor_options = run_dir, log_every, monitor_options
        self.monitor: Any = None
        self._losses: list[torch.Tensor] = []
        self._tokens = 0
        self._last_global_step = 0
        self._pending_state: dict[str, Any] | None = None

    def on_train_start(self, trainer, pl_module):
        from tdiag import Monitor

        optimizers = trainer.optimizers
        options = {
            "console": False,
            "total_steps": trainer.max_steps if trainer.max_steps > 0 else None,
        }
        options.update(self.monitor_options)
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        clip = getattr(trainer, "gradient_clip_val", None)
        by_norm = getattr(trainer, "gradient_clip_algorithm", "norm") in (None, "norm")
        if isinstance(clip, int | float) and not isinstance(clip, bool) and clip > 0 and by_norm:
            hparams.setdefault("gradient_clip_val", float(clip))
            options.setdefault("clip", float(clip))
        precision = getattr(trainer, "precision_plugin", None)
        options.setdefault("scaler", getattr(precision, "scaler", None))  # fp16 GradScaler
        if options.get("forensics"):
            if getattr(pl_module, "automatic_optimization", True):
                options.setdefault("loss_fn", training_step_loss)
            elif options.get("loss_fn") is None:  # training_step steps the optimizer itself
                logger.warning("tdiag: forensics off (manual optimization: no loss_fn to replay)")
                options["forensics"] = False
        self.monitor = Monitor(
            pl_module,
            optimizer=optimizers[0] if optimizers else None,
            run_dir=self.run_dir,
            log_every=self.log_every,
            config=hparams,
            **options,
        )
        if self.monitor.forensics is not None:  # the replay's copy must not copy the trainer
            self.monitor.forensics.detach = (trainer,)
        self._last_global_step = trainer.global_step
        # Resumed from a Lightning checkpoint: the Monitor's own state came with it (this
        # callback's state_dict), else count on from the trainer's step.
        if self._pending_state:
            self.monitor.load_state_dict(self._pending_state)
        elif trainer.global_step > 0:
            self.monitor.load_state_dict(
                {"version": 1, "step": int(trainer.global_step), "tokens_total": 0.0}
            )
        self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in its checkpoints (resume restores the Monitor's steps)."""
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) or None  # applied once the Monitor exists

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is None:
            return
        loss = _loss_from(outputs)
        if loss is not None:
            self._losses.append(loss)
        self._tokens += _tokens_from(batch)
        if trainer.global_step == self._last_global_step:
            return  # still accumulating micro-batches
        self._last_global_step = trainer.global_step
        # Lightning hands on_train_batch_end the loss divided by accumulate_grad_batches
        # (what it back-propagates), so the optimizer step's loss is the sum.
        loss_sum = torch.stack(self._losses).sum() if self._losses else None
        if not self.monitor.guard_stopped:  # after a guard stop the Monitor takes no more steps
            self.monitor.step(loss_sum, tokens=self._tokens or None, batch=batch)
        self._losses, self._tokens = [], 0
        if self.monitor.should_stop:  # SIGTERM/SIGINT, or the guard (on_nonfinite/on_spike)
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module):
        if self.monitor is None or trainer.sanity_checking:
            return
        for key in _VAL_KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.monitor.log({"val/loss": float(value)}, step=trainer.global_step)  # host sync
                break

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            try:
                self.monitor.close()
            finally:  # also after a signal (close raises SystemExit then)
                print_report_line(self.monitor)
