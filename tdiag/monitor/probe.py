"""Gradient norm, LR and update/weight ratio of one optimizer step, measured on log steps only.

Keys (see docs/metrics.md): ``train/grad_norm``, ``train/grad_norm_post_clip``,
``train/update_ratio``, ``grad_norm/<module>``; the probe also keeps the LRs the step used
(``step_lrs``) for ``train/lr``.

Where the gradient norm comes from. Loops clip between ``backward()`` and
``optimizer.step()`` (nanoGPT, ``transformers.Trainer``, Lightning), so the optimizer's
step hooks only ever see the clipped gradient, and Lightning's ``optimizer.step(closure)``
runs the pre-hook before this step's backward. The probe therefore reads the gradient when
the backward pass has *finished*: while armed, every trainable parameter carries a
``register_post_accumulate_grad_hook``; the first one to fire in a backward queues an
autograd-engine final callback, which queues a second one, so that it runs after the
callbacks the engine already holds — DDP's, which write the all-reduced gradients into
``.grad`` at the end of backward. That callback takes ``sum ||grad||²`` on the device: with
gradient accumulation each micro-batch's backward overwrites it, so the last one — the full
accumulated gradient — is what the log step reports. No host sync, and nothing at all on the
steps in between (the hooks are removed when the log step ends).

Mixed precision: at the end of backward the gradients are still multiplied by the loss
scale S. S is read from ``optimizer.grad_scale`` (set by ``GradScaler.step`` for fused
optimizers), from the ``scaler=`` given to the Monitor (``GradScaler.get_scale()``, one host
read on log steps), or, without either, recognised when the gradient the optimizer used is
exactly the backward's divided by a power of two (``unscale_()`` with no clipping).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tdiag.monitor.metrics import (
    DeviceBatch,
    is_sharded,
    local_sq_norm,
    per_tensor_sq_norms,
    to_local,
)

__all__ = ["GradientProbe", "owner_module", "preclip_factor"]

logger = logging.getLogger(__name__)

_engine = torch.autograd.Variable._execution_engine  # queue_callback: FSDP and DDP use it too


def owner_module(param_name: str) -> str:
    """``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.qkv`` (``""`` for a root parameter)."""
    return param_name.rpartition(".")[0]


def _is_pow2_ratio(ratio: float) -> bool:
    if not (ratio >= 2.0 and math.isfinite(ratio)):
        return False
    k = math.log2(ratio)
    return abs(k - round(k)) < 1e-4


def preclip_factor(bwd_sq: float, used_sq: float | None, scale: float | None) -> float | None:
    """The factor that turns the end-of-backward gradient into the unscaled pre-clip one.

    Args:
        bwd_sq: ``sum ||grad||²`` at the end of the (last) backward.
        used_sq: the same, of the gradient ``optimizer.step()`` used (None: not measured).
        scale: the loss scale, when known.

    Returns:
        ``1/S`` with a known scale; ``sqrt(used/bwd)`` when the two differ by exactly a power
        of two (``GradScaler.unscale_()`` and no clipping); ``1.0`` otherwise (no scaling,
        whatever clipping did); None when the gradients were scaled and then clipped with no
        known scale (the pre-clip norm cannot be told).
    """
    if scale is not None and scale > 0:
        return 1.0 / scale
    if used_sq is None or not (used_sq > 0 and bwd_sq > used_sq):
        return 1.0
    ratio = math.sqrt(bwd_sq / used_sq)
    if _is_pow2_ratio(ratio):
        return 1.0 / ratio
    if ratio >= 128.0:  # far more than a clip cuts, not a power of two: scaled and clipped
        return None
    return 1.0


class GradientProbe:
    """Measure gradients, LRs and the parameter update of ONE optimizer step, when armed.

    :meth:`arm` (the Monitor calls it after the ``step()`` that precedes a log step) puts
    post-accumulate-grad hooks on the trainable parameters (see the module docstring);
    ``optimizer.register_step_pre_hook`` / ``register_step_post_hook``, registered once,
    return at once unless armed. When armed, the pre-hook keeps the LRs the step uses and a
    snapshot of the parameters; the post-hook takes ``||θ_after − θ_before||²``,
    ``||θ_before||²`` and the norm of the gradient the step used (after any clipping),
    and frees the snapshot. All on the device, no host sync (but ``scaler.get_scale()``).
    The snapshot costs one copy of the parameters for the duration of ``optimizer.step()``
    on log steps.

    A hook that fails logs once and disables the probe: monitoring never stops training.
    """

    def __init__(
        self,
        optimizer: Any,
        names: Mapping[int, str],
        *,
        params: Sequence[torch.Tensor] = (),
        update_ratio: bool = True,
        per_tensor: bool = False,
        scaler: Any = None,
    ) -> None:
        self.optimizer = optimizer
        self._names = names  # id(param) -> parameter name
        self._model_params = [p for p in params if p.requires_grad]
        self.update_ratio = update_ratio
        self.per_tensor = per_tensor
        self.scaler = scaler
        self.armed = False
        self.enabled = True
        self.rolling = False
        """Measure every optimizer step while armed (the last one wins), not only the first."""
        self.values: dict[str, torch.Tensor] = {}
        self.tensor_names: list[str] = []
        self.step_lrs: list[float | torch.Tensor | None] | None = None
        self.scale: float | None = None
        self.backwards = 0  # backward passes seen while armed
        self.sharded = False
        self.update_names: list[str] = []  # names / param groups of ``values["stuck"]``
        self.update_groups: list[int] = []
        self._before: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._queued = False
        self._closure = False
        self._stepped = False
        self._post_done = False
        self._warned_scaled_clip = False
        self._bwd_handles: list[Any] = []
        self._handles = []
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._handles = [
                optimizer.register_step_pre_hook(self._pre),
                optimizer.register_step_post_hook(self._post),
            ]

    @property
    def done(self) -> bool:
        """True once the armed step's gradients were measured (at backward end or at step)."""
        return "grad_sq" in self.values or "bwd_sq" in self.values

    # -- arming ----------------------------------------------------------------------------
    def arm(self) -> None:
        """Start watching the next optimizer step (hooks on the parameters until disarm)."""
        self.reset()
        self.armed = True
        if not self.enabled or self._bwd_handles:
            return
        hook = self._on_accumulate
        try:
            self._bwd_handles = [
                p.register_post_accumulate_grad_hook(hook) for p in self._model_params
            ]
        except RuntimeError as exc:  # e.g. a non-leaf "parameter"
            logger.debug("tdiag: no end-of-backward gradient hooks (%r)", exc)
            self._remove_bwd_hooks()

    def disarm(self) -> None:
        self.armed = False
        self._remove_bwd_hooks()

    def _remove_bwd_hooks(self) -> None:
        for h in self._bwd_handles:
            h.remove()
        self._bwd_handles = []
        self._queued = False

    def _on_accumulate(self, param: torch.Tensor) -> None:
        if self._queued or not (self.armed and self.enabled):
            return
        self._queued = True
        try:
            # Runs at the end of this backward; it queues the measurement behind the final
            # callbacks already queued (DDP's writes the all-reduced gradients).
            _engine.queue_callback(lambda: _engine.queue_callback(self._after_backward))
        except RuntimeError as exc:
            self._queued = False
            logger.debug("tdiag: cannot queue the end-of-backward measurement (%r)", exc)

    def _after_backward(self) -> None:
        self._queued = False
        if self._post_done and not self.rolling:
            return  # the measured step is over: a later backward belongs to the next one

        def run() -> None:
            if self.measure_grads(self._model_params, key="bwd_sq"):
                self.backwards += 1

        self._guard(run)

    # -- measurement -----------------------------------------------------------------------
    def measure_grads(self, params: Sequence[torch.Tensor], *, key: str = "grad_sq") -> bool:
        """Measure the gradients of ``params`` now into ``values[key]`` (``bwd_sq`` at the end
        of backward, ``grad_sq`` at the optimizer step or the log step). Per-tensor norms
        come from the end of backward when it was measured. Returns whether it measured."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return False
        grads = [p.grad for p in with_grad]
        self.sharded = any(is_sharded(g) for g in grads)
        sq = local_sq_norm(grads)
        if sq is None:
            return False
        self.values[key] = sq
        if self.per_tensor and (key == "bwd_sq" or "bwd_sq_per_tensor" not in self.values):
            self.tensor_names = [self._names.get(id(p), "?") for p in with_grad]
            self.values[f"{key}_per_tensor"] = per_tensor_sq_norms(
                [to_local(g).detach() for g in grads]
            )
        return True

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # a monitoring failure never stops training
            logger.warning("tdiag: gradient/update measurement failed (%r); it is disabled", exc)
            self.enabled = False
            self._before = None

    def _unscale_fused(self, optimizer: Any) -> None:
        # GradScaler.step() on a fused optimizer passes the still-scaled gradients with
        # ``optimizer.grad_scale`` set (None once unscale_() ran): report unscaled norms.
        scale = getattr(optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor) and "grad_sq" in self.values:
            self.values["grad_scale"] = scale.detach().float().reshape(())
            inv_sq = self.values["grad_scale"].reciprocal().square()
            for key in ("grad_sq", "grad_sq_per_tensor"):
                if key in self.values:
                    self.values[key] = self.values[key] * inv_sq.to(self.values[key].device)

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self.armed and self.enabled) or self._stepped:
            return
        self._stepped = True  # the first optimizer step after arming is the one measured

        def run() -> None:
            groups = optimizer.param_groups
            lrs = [g.get("lr") for g in groups]
            self.step_lrs = [
                lr.detach().clone() if isinstance(lr, torch.Tensor) else lr for lr in lrs
            ]
            if self.scaler is not None and self.scale is None and _scaler_enabled(self.scaler):
                self.scale = float(self.scaler.get_scale())  # host read, log steps only
            params = [p for g in groups for p in g["params"]]
            # ``step(closure)`` (Lightning): the backward runs inside the step, after this
            # hook; the gradient the step uses is measured in the post-hook instead.
            # (``args`` holds the optimizer itself first: the hooks see ``step``'s self.)
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            self._closure = callable(closure)
            for key in ("grad_sq", "grad_sq_per_tensor", "grad_scale"):  # a rolled-over step's
                self.values.pop(key, None)
            if not self._closure:
                self.measure_grads(params)
                self._unscale_fused(optimizer)
            if self.update_ratio:
                self._params = [p for p in params if p.requires_grad]
                locals_ = [to_local(p).detach() for p in self._params]
                with torch.no_grad():
                    self._before = list(torch._foreach_mul(locals_, 1.0)) if locals_ else None

        self._guard(run)

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self.armed and self.enabled and self._stepped) or self._post_done:
            return
        self._post_done = True

        def run() -> None:
            # The step's own end-of-backward gradient: a later backward (the next step's
            # first micro-batch, before the loop calls mon.step()) must not replace it.
            for key in ("bwd_sq", "bwd_sq_per_tensor"):
                if key in self.values:
                    self.values[f"step_{key}"] = self.values[key]
            if self._closure and "grad_sq" not in self.values:
                self.measure_grads([p for g in optimizer.param_groups for p in g["params"]])
                self._unscale_fused(optimizer)
            before = self._before
            if before is None:
                return
            with torch.no_grad():
                pairs = [(p, b) for p, b in zip(self._params, before, strict=True)]
                after = [to_local(p).detach() for p, _ in pairs]
                diff = torch._foreach_sub(after, [b for _, b in pairs])
                update_sq = per_tensor_sq_norms(diff)
                self.values["update_sq"] = update_sq.sum()
                self.values["param_sq"] = per_tensor_sq_norms(before).sum()
                # Not updated although the step had a gradient for it (loop.params-not-updated)
                grads = [
                    to_local(p.grad).detach() if p.grad is not None else torch.zeros_like(b[:1])
                    for p, b in pairs
                ]
                gsq = per_tensor_sq_norms(grads)
                self.values["stuck"] = ((gsq > 0) & (update_sq == 0)).float()
                self.update_names = [self._names.get(id(p), "?") for p, _ in pairs]
                group_of = {
                    id(q): i for i, g in enumerate(optimizer.param_groups) for q in g["params"]
                }
                self.update_groups = [group_of.get(id(p), 0) for p, _ in pairs]
            self._before = None
            self._params = []

        self._guard(run)
        if self.rolling:  # measure every optimizer step until the Monitor stops rolling
            self._stepped = self._post_done = False

    # -- to the host -----------------------------------------------------------------------
    def add_to(self, batch: DeviceBatch) -> None:
        """Put the measured values into ``batch``: sums over ranks when sharded, else means."""
        reduce = "sum" if self.sharded else "mean"
        for key in ("bwd_sq", "bwd_sq_per_tensor"):
            if f"step_{key}" in self.values:
                self.values[key] = self.values[f"step_{key}"]
        for key in (
            "bwd_sq",
            "bwd_sq_per_tensor",
            "grad_sq",
            "grad_sq_per_tensor",
            "update_sq",
            "param_sq",
            "stuck",
        ):
            if key in self.values:
                batch.add(f"probe/{key}", self.values[key], reduce)
        if "grad_scale" in self.values:
            batch.add("probe/grad_scale", self.values["grad_scale"], "max")

    def metrics(
        self, host: Mapping[str, Any], tensor_names: Sequence[str], *, scale: float | None = None
    ) -> dict[str, float]:
        """``train/grad_norm`` (pre-clip), ``train/grad_norm_post_clip``,
        ``train/update_ratio`` and ``grad_norm/<module>`` from host values."""
        out: dict[str, float] = {}
        used = host["probe/grad_sq"][0] if "probe/grad_sq" in host else None
        per: Sequence[float] | None = None
        if "probe/bwd_sq" in host:
            bwd = host["probe/bwd_sq"][0]
            if scale is None and "probe/grad_scale" in host:
                scale = host["probe/grad_scale"][0]
            factor = preclip_factor(bwd, used, scale) if bwd == bwd else 1.0
            if factor is None:
                self._warn_scaled_clip()
            else:
                out["train/grad_norm"] = math.sqrt(max(bwd, 0.0)) * factor if bwd == bwd else bwd
                if host.get("probe/bwd_sq_per_tensor") is not None:
                    per = [v * factor * factor for v in host["probe/bwd_sq_per_tensor"]]
        elif used is not None:
            out["train/grad_norm"] = math.sqrt(max(used, 0.0)) if used == used else used
            per = host.get("probe/grad_sq_per_tensor")
        if used is not None:
            out["train/grad_norm_post_clip"] = math.sqrt(max(used, 0.0)) if used == used else used
        if "probe/update_sq" in host and "probe/param_sq" in host:
            den = math.sqrt(max(host["probe/param_sq"][0], 0.0))
            num = math.sqrt(max(host["probe/update_sq"][0], 0.0))
            out["train/update_ratio"] = num / den if den > 0 else math.nan
        if per is not None:
            sums: dict[str, float] = {}
            for name, sq in zip(tensor_names, per, strict=False):
                module = owner_module(name) or name
                sums[module] = sums.get(module, 0.0) + sq
            for module, sq in sums.items():
                out[f"grad_norm/{module}"] = math.sqrt(max(sq, 0.0)) if sq == sq else math.nan
        return out

    def _warn_scaled_clip(self) -> None:
        if not self._warned_scaled_clip:
            self._warned_scaled_clip = True
            logger.warning(
                "tdiag: the gradients were loss-scaled and then clipped, and the loss scale is "
                "unknown: train/grad_norm (before clipping) cannot be told and is not logged. "
                "Pass scaler=your_grad_scaler to Monitor()."
            )

    def lr_metrics(self) -> dict[str, float] | None:
        """``train/lr`` (group 0) and ``train/lr/<i>`` as used by the armed step, or None
        when no optimizer step was seen. A tensor LR is read with ``float()`` (log steps)."""
        if self.step_lrs is None:
            return None
        out: dict[str, float] = {}
        for i, lr in enumerate(self.step_lrs):
            if lr is not None:
                out["train/lr" if i == 0 else f"train/lr/{i}"] = float(lr)
        return out

    def reset(self) -> None:
        self.values = {}
        self.tensor_names = []
        self.step_lrs = None
        self.scale = None
        self.backwards = 0
        self._before = None
        self._params = []
        self._closure = False
        self._stepped = False
        self._post_done = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.disarm()
        self.reset()


def _scaler_enabled(scaler: Any) -> bool:
    enabled = getattr(scaler, "is_enabled", None)
    return bool(enabled()) if callable(enabled) else True
