"""Gradient norm and update/weight ratio of one optimizer step, measured on log steps only.

Keys (see docs/metrics.md): ``train/grad_norm``, ``train/update_ratio``, ``grad_norm/<module>``.
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

__all__ = ["GradientProbe", "owner_module"]

logger = logging.getLogger(__name__)


def owner_module(param_name: str) -> str:
    """``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.qkv`` (``""`` for a root parameter)."""
    return param_name.rpartition(".")[0]


class GradientProbe:
    """Measure gradients and the parameter update of ONE optimizer step, when armed.

    Registers ``optimizer.register_step_pre_hook`` / ``register_step_post_hook`` once; the
    hooks return at once unless :attr:`armed` is set (the Monitor arms it before a log step).
    When armed, the pre-hook (gradients are complete, after any clipping the loop did) takes
    the squared global gradient norm, per-tensor squared norms (for ``grad_norm/<module>``)
    and a snapshot of the parameters; the post-hook takes ``||θ_after − θ_before||²`` and
    ``||θ_before||²`` and frees the snapshot. All on the device, no host sync. The snapshot
    costs one copy of the parameters for the duration of ``optimizer.step()`` on log steps.

    A hook that fails logs once and disables the probe: monitoring never stops training.
    """

    def __init__(
        self,
        optimizer: Any,
        names: Mapping[int, str],
        *,
        update_ratio: bool = True,
        per_tensor: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self._names = names  # id(param) -> parameter name
        self.update_ratio = update_ratio
        self.per_tensor = per_tensor
        self.armed = False
        self.enabled = True
        self.values: dict[str, torch.Tensor] = {}
        self.tensor_names: list[str] = []
        self.sharded = False
        self._before: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._handles = []
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._handles = [
                optimizer.register_step_pre_hook(self._pre),
                optimizer.register_step_post_hook(self._post),
            ]

    @property
    def done(self) -> bool:
        """True once the armed step's gradients were measured."""
        return "grad_sq" in self.values

    def measure_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Measure the gradients of ``params`` now (used without an optimizer hook)."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        grads = [p.grad for p in with_grad]
        self.sharded = any(is_sharded(g) for g in grads)
        sq = local_sq_norm(grads)
        if sq is None:
            return
        self.values["grad_sq"] = sq
        if self.per_tensor:
            self.tensor_names = [self._names.get(id(p), "?") for p in with_grad]
            self.values["grad_sq_per_tensor"] = per_tensor_sq_norms(
                [to_local(g).detach() for g in grads]
            )

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # a monitoring failure never stops training
            import logging

            logging.getLogger(__name__).warning(
                "tdiag: gradient/update measurement failed (%r); it is disabled", exc
            )
            self.enabled = False
            self._before = None

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self.armed and self.enabled) or self.done:
            return

        def run() -> None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.measure_grads(params)
            # GradScaler.step() on a fused optimizer passes the still-scaled gradients with
            # ``optimizer.grad_scale`` set (None once unscale_() ran): report unscaled norms.
            scale = getattr(optimizer, "grad_scale", None)
            if isinstance(scale, torch.Tensor) and "grad_sq" in self.values:
                inv_sq = scale.detach().float().reciprocal().square()
                for key in ("grad_sq", "grad_sq_per_tensor"):
                    if key in self.values:
                        self.values[key] = self.values[key] * inv_sq.to(self.values[key].device)
            if self.update_ratio:
                self._params = [p for p in params if p.grad is not None]
                locals_ = [to_local(p).detach() for p in self._params]
                with torch.no_grad():
                    self._before = list(torch._foreach_mul(locals_, 1.0)) if locals_ else None

        self._guard(run)

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._before is None or not self.enabled:
            return

        def run() -> None:
            before = self._before
            assert before is not None
            with torch.no_grad():
                after = [to_local(p).detach() for p in self._params]
                diff = torch._foreach_sub(after, before)
                self.values["update_sq"] = per_tensor_sq_norms(diff).sum()
                self.values["param_sq"] = per_tensor_sq_norms(before).sum()
            self._before = None
            self._params = []

        self._guard(run)

    def add_to(self, batch: DeviceBatch) -> None:
        """Put the measured values into ``batch``: sums over ranks when sharded, else means."""
        reduce = "sum" if self.sharded else "mean"
        for key in ("grad_sq", "grad_sq_per_tensor", "update_sq", "param_sq"):
            if key in self.values:
                batch.add(f"probe/{key}", self.values[key], reduce)

    @staticmethod
    def metrics(host: Mapping[str, Any], tensor_names: Sequence[str]) -> dict[str, float]:
        """``train/grad_norm``, ``train/update_ratio`` and ``grad_norm/<module>`` from host values."""
        out: dict[str, float] = {}
        if "probe/grad_sq" in host:
            out["train/grad_norm"] = math.sqrt(max(host["probe/grad_sq"][0], 0.0))
        if "probe/update_sq" in host and "probe/param_sq" in host:
            den = math.sqrt(max(host["probe/param_sq"][0], 0.0))
            num = math.sqrt(max(host["probe/update_sq"][0], 0.0))
            out["train/update_ratio"] = num / den if den > 0 else math.nan
        per = host.get("probe/grad_sq_per_tensor")
        if per is not None:
            sums: dict[str, float] = {}
            for name, sq in zip(tensor_names, per, strict=False):
                module = owner_module(name) or name
                sums[module] = sums.get(module, 0.0) + sq
            for module, sq in sums.items():
                out[f"grad_norm/{module}"] = math.sqrt(max(sq, 0.0)) if sq == sq else math.nan
        return out

    def reset(self) -> None:
        self.values = {}
        self.tensor_names = []
        self._before = None
        self._params = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()
