"""Hugging Face ``transformers.Trainer`` adapter: the Monitor as a ``TrainerCallback``.

    from tdiag.integrations.huggingface import TdiagCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[TdiagCallback(run_dir="reports/hf")])

The callback reads state and never changes the Trainer's control flow, except to ask for a
stop (``control.should_training_stop``) after SIGTERM/SIGINT or when the opt-in guard stops
the run (``on_nonfinite=``/``on_spike="stop"``), so that the run saves and ends cleanly. The loss is read from the model's output (``.loss``) with a forward hook,
so no host sync is added between log steps.
"""

from __future__ import annotations

from typing import Any

from tdiag.integrations._loss_tap import LossTap
from tdiag.integrations._report_line import print_report_line

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "tdiag.integrations.huggingface needs the `transformers` package: pip install 'tdiag[hf]'"
    ) from exc

__all__ = ["TdiagCallback", "hf_loss"]


def hf_loss(model: Any, batch: dict[str, Any]) -> Any:
    """``loss_fn`` for forensics: what ``Trainer.compute_loss`` does without a label smoother
    or a custom loss: the model's own loss (``model(**inputs)["loss"]``). A Trainer subclass with its own
    ``compute_loss`` passes ``loss_fn=lambda m, b: trainer.compute_loss(m, b)`` instead."""
    from tdiag.forensics import loss_of

    return loss_of(model(**batch))


class TdiagCallback(TrainerCallback):
    """Run a :class:`tdiag.Monitor` inside a Hugging Face Trainer.

    Args:
        run_dir: the run folder (default: ``<output_dir>/tdiag``).
        log_every: steps per log interval (default: the Trainer's ``logging_steps``).
        **monitor_options: any other :class:`tdiag.Monitor` option (``watch``, ``wandb``, …);
            ``forensics=True`` replays the first non-finite step with :func:`hf_loss` (the
            inputs of the step's last training forward are its batch) unless ``loss_fn=``.
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
        if options.get("forensics"):  # the replay re-runs compute_loss's default path
            options.setdefault("loss_fn", hf_loss)
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
        if not self.monitor.guard_stopped:  # after a guard stop the Monitor takes no more steps
            self.monitor.step(loss, tokens=tokens or None, batch=self._tap.batch)
        if self.monitor.should_stop:  # SIGTERM/SIGINT, or the guard (on_nonfinite/on_spike)
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.monitor is not None and metrics and "eval_loss" in metrics:
            self.monitor.log({"val/loss": metrics["eval_loss"]}, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self.monitor is not None:
            try:
                self.monitor.close()
            finally:  # also after a signal (close raises SystemExit then)
                print_report_line(self.monitor)
