"""Hugging Face ``transformers.Trainer`` adapter: the Monitor as a ``TrainerCallback``.

    from tdiag.integrations.huggingface import TdiagCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[TdiagCallback(run_dir="reports/hf")])

The callback reads state and never changes the Trainer's control flow, except to ask for a
stop (``control.should_training_stop``) after SIGTERM/SIGINT, so that the run saves and
ends cleanly. The loss is read from the model's output (``.loss``) with a forward hook,
so no host sync is added between log steps.
"""

from __future__ import annotations

from typing import Any

from tdiag.integrations._loss_tap import LossTap

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "tdiag.integrations.huggingface needs the `transformers` package: pip install 'tdiag[hf]'"
    ) from exc

__all__ = ["TdiagCallback"]


class TdiagCallback(TrainerCallback):
    """Run a :class:`tdiag.Monitor` inside a Hugging Face Trainer.

    Args:
        run_dir: the run folder (default: ``<output_dir>/tdiag``).
        log_every: steps per log interval (default: the Trainer's ``logging_steps``).
        **monitor_options: any other :class:`tdiag.Monitor` option (``watch``, ``wandb``, …).
    """

    def __init__(
        self, run_dir: str | None = None, log_every: int | None = None, **monitor_options: Any
    ):
        self.run_dir = run_dir
        self.log_every = log_every
        self.monitor_options = monitor_options
        self.monitor: Any = None
        self._tap: LossTap | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from tdiag import Monitor

        if model is None:
            raise ValueError("TdiagCallback needs the Trainer to pass `model` to on_train_begin")
        log_every = self.log_every or max(1, int(getattr(args, "logging_steps", 10) or 10))
        run_dir = self.run_dir or f"{args.output_dir}/tdiag"
        options = {"console": False, "total_steps": state.max_steps or None, **self.monitor_options}
        config = {
            k: v for k, v in args.to_dict().items() if isinstance(v, int | float | str | bool)
        }
        # accelerate wraps the optimizer; the Monitor hooks the torch optimizer inside it.
        # Its GradScaler (fp16) gives the loss scale for the unscaled pre-clip norm; the clip
        # threshold comes from the config's max_grad_norm. The LR is read in the optimizer's
        # step pre-hook: the Trainer's scheduler steps before on_step_end.
        inner = getattr(optimizer, "optimizer", optimizer)
        options.setdefault("scaler", getattr(optimizer, "scaler", None))
        self.monitor = Monitor(
            model, optimizer=inner, run_dir=run_dir, log_every=log_every, config=config, **options
        )
        self._tap = LossTap(model)
        if state.global_step > 0:  # resume_from_checkpoint: count on from the Trainer's step
            tokens = float(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.monitor.load_state_dict(
                {"version": 1, "step": int(state.global_step), "tokens_total": tokens}
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None or self._tap is None:
            return
        loss, tokens = self._tap.take()
        self.monitor.step(loss, tokens=tokens or None)
        if self.monitor.stop_requested:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.monitor is not None and metrics and "eval_loss" in metrics:
            self.monitor.log({"val/loss": metrics["eval_loss"]}, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self.monitor is not None:
            self.monitor.close()
