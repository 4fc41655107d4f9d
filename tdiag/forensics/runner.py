"""Running replayed steps on the scratch copies: one step as the training loop ran it (with
its RNG state and LRs), a probe without update, and a step with every recorder armed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdiag.forensics.keeper import StepRecord
from tdiag.forensics.layers import LayerProbe
from tdiag.forensics.rng import restore_rng
from tdiag.hooks import ActivationRecorder, GradientRecorder
from tdiag.hooks.attention import AttentionCapture
from tdiag.hooks.ops import OpTracer
from tdiag.stats import tensor_stats

__all__ = ["Runner", "StepOutcome", "loss_of", "param_abs_max"]

#: Parameters listed by :meth:`Runner.largest_grads`.
TOP_GRADS = 5

LossFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class StepOutcome:
    """One replayed step: its loss and global gradient norm (host floats).

    ``grad_norm`` is taken as the Monitor takes it (``sqrt(sum ||g||²)`` in float32), so
    the replay calls a step bad exactly when the live run would: a NaN/Inf gradient entry,
    or gradients so large that the norm overflows.
    """

    loss: float
    grad_norm: float

    @property
    def grads_finite(self) -> bool:
        return math.isfinite(self.grad_norm)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and self.grads_finite


def loss_of(output: Any) -> torch.Tensor:
    """The loss tensor in what a ``loss_fn`` / ``training_step`` / ``compute_loss`` returned:
    a tensor, ``{"loss": tensor}``, an object with ``.loss``, or a ``(loss, outputs)`` tuple.

    Raises:
        TypeError: no tensor loss in it.
    """
    loss = output
    if isinstance(loss, dict):
        loss = loss.get("loss")
    elif isinstance(loss, tuple | list) and loss:
        loss = loss[0]
    elif not isinstance(loss, torch.Tensor):
        loss = getattr(loss, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a loss tensor (or {{'loss': tensor}}), got {type(output).__name__}"
        )
    return loss if loss.dim() == 0 else loss.float().mean()


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Leave the model's buffers (BatchNorm running stats) as they were after the block."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


class Runner:
    """Runs replayed steps on the scratch model/optimizer."""

    def __init__(
        self, model: nn.Module, optimizer: Any, loss_fn: LossFn, clip: float | None
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.clip = model, optimizer, loss_fn, clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def _forward(self, rec: StepRecord) -> torch.Tensor:
        if rec.rng is not None:
            restore_rng(rec.rng)
        return loss_of(self.loss_fn(self.model, rec.batch))

    def _grad_norm(self) -> float:
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        dev = grads[0].device
        norms = torch.stack([n.float().to(dev) for n in torch._foreach_norm(grads)])
        return float(norms.square().sum().sqrt())  # host sync (replay only)

    def largest_grads(self) -> dict[str, float]:
        """The parameters with the largest gradient norms (float64, so no overflow)."""
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return {}
        norms = torch.stack([g.detach().double().norm() for _, g in named]).tolist()  # host sync
        top = sorted(zip(norms, [n for n, _ in named], strict=True), key=lambda r: -r[0])
        return {n: v for v, n in top[:TOP_GRADS]}

    def step(self, rec: StepRecord, *, update: bool) -> StepOutcome:
        """One step: forward, backward, clip and (``update``) the optimizer step."""
        self._zero()
        with torch.enable_grad():
            loss = self._forward(rec)
            value = float(loss.detach().float())  # host sync (replay only)
            if loss.requires_grad:
                loss.backward()
        norm = self._grad_norm()
        if update and self.optimizer is not None:
            if rec.lrs is not None:
                for group, lr in zip(self.optimizer.param_groups, rec.lrs, strict=False):
                    if lr is not None:
                        group["lr"] = lr
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
        self._zero()
        return StepOutcome(value, norm)

    def probe(self, rec: StepRecord) -> StepOutcome:
        """The step's forward/backward without an update (buffers left as they were)."""
        with _buffers_kept(self.model):
            return self.step(rec, update=False)

    def recorded(self, rec: StepRecord) -> tuple[StepOutcome, dict[str, Any]]:
        """The step without an update, twice (same RNG): with the module recorders, then with
        the op tracer (apart, so that the tracer does not see the recorders' own reductions).
        Returns the outcome and the host rows."""
        self._zero()
        act = ActivationRecorder(self.model, inputs=True)
        grad = GradientRecorder(self.model, inputs=True, params=False)
        with _buffers_kept(self.model), act, grad, torch.enable_grad():
            loss = self._forward(rec)
            value = float(loss.detach().float())  # host sync (replay only)
            if loss.requires_grad:
                loss.backward()
        norm = self._grad_norm()
        largest = self.largest_grads()
        self._zero()
        tracer = OpTracer(self.model)
        with _buffers_kept(self.model), torch.enable_grad():
            with tracer:
                loss = self._forward(rec)
            if loss.requires_grad:
                loss.backward()
        self._zero()
        rows = {
            "forward": act.to_host(),
            "backward": grad.to_host(),
            "ops": tracer.to_host(),
            "largest_grads": largest,
        }
        return StepOutcome(value, norm), rows

    def layer_stats(self, rec: StepRecord) -> dict[str, Any]:
        """The step without an update, with the per-layer statistics recorded (attention max
        logit, output log Z, gradient norm: :mod:`tdiag.forensics.layers`); host values."""
        self._zero()
        probe = LayerProbe(self.model)
        with _buffers_kept(self.model), torch.enable_grad(), probe:
            with AttentionCapture(model=self.model) as capture:
                loss = self._forward(rec)
            if loss.requires_grad:
                loss.backward()
            out = probe.to_host(capture)
        self._zero()
        return out


def param_abs_max(model: nn.Module) -> dict[str, float]:
    named = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
    if not named:
        return {}
    with torch.no_grad():
        values = torch.stack([tensor_stats(p)[1] for _, p in named]).tolist()  # host sync
    return {n: v for (n, _), v in zip(named, values, strict=True)}
