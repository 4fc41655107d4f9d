"""Gradient statistics per module output and per parameter, in the order backward produced them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tdiag.hooks.common import (
    _HOOK_ERRORS,
    ModuleFilter,
    _default_filter,
    _HookOwner,
    first_float_tensor,
)
from tdiag.stats import STAT_NAMES, tensor_stats

__all__ = ["GradRecord", "GradientRecorder"]


@dataclass
class GradRecord:
    """One gradient seen during backward.

    Attributes:
        name: module path (``kind == "module"``) or parameter path (``kind == "param"``).
        kind: "module" (gradient w.r.t. the module's output), "module_input" (w.r.t. its
            first floating input) or "param" (the parameter's gradient).
        order: 0-based index in the order backward produced the gradients.
        stats: ``Tensor[4]`` (``tdiag.stats.STAT_NAMES``) of the gradient, on the device.
    """

    name: str
    kind: str
    order: int
    stats: torch.Tensor


class GradientRecorder(_HookOwner):
    """Records gradient statistics per module output and per parameter, in arrival order.

    Module gradients are taken with a tensor hook on the module's output, registered by a
    forward hook, rather than ``register_full_backward_hook``: the latter wraps outputs in a
    custom autograd function that breaks in-place ops on them (``nn.ReLU(inplace=True)``).
    Parameter gradients come from ``Parameter.register_hook`` (before accumulation into
    ``.grad``, so each backward is seen on its own).

    Records accumulate over backward passes: call :meth:`clear` once per step (it also drops
    the per-forward tensor hooks of graphs already used).

    Args:
        model: the model.
        module_filter: which modules get an output-gradient hook (default: all but the root).
        modules: record module output gradients. params: record parameter gradients.
        inputs: also record the gradient w.r.t. each module's first floating input
            (``kind == "module_input"``; with ``modules``), which tells which module's own
            backward made a gradient non-finite (``tdiag.hooks.locate``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        module_filter: ModuleFilter | None = None,
        modules: bool = True,
        params: bool = True,
        inputs: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.module_filter = module_filter or _default_filter
        self.record_modules = modules
        self.record_params = params
        self.record_inputs = inputs
        self.records: list[GradRecord] = []
        self._tensor_handles: list[RemovableHandle] = []

    @property
    def module_records(self) -> list[GradRecord]:
        return [r for r in self.records if r.kind == "module"]

    @property
    def param_records(self) -> list[GradRecord]:
        return [r for r in self.records if r.kind == "param"]

    def attach(self) -> GradientRecorder:
        """Register the hooks (no-op when already attached)."""
        if self._handles:
            return self
        if self.record_modules:
            for name, module in self.model.named_modules():
                if self.module_filter(name, module):
                    self._handles.append(module.register_forward_hook(self._make_fwd_hook(name)))
        if self.record_params:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._make_grad_hook(name, "param")))
        return self

    def _make_fwd_hook(self, name: str) -> Callable[..., None]:
        grad_hook = self._make_grad_hook(name, "module")
        input_hook = self._make_grad_hook(name, "module_input")

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if not self.enabled:
                return
            out = first_float_tensor(output)
            try:
                if out is not None and out.requires_grad:
                    self._tensor_handles.append(out.register_hook(grad_hook))
                if self.record_inputs:
                    inp = first_float_tensor(args)
                    if inp is not None and inp.requires_grad:
                        self._tensor_handles.append(inp.register_hook(input_hook))
            except _HOOK_ERRORS as exc:
                self._hook_failed(name, exc)

        return hook

    def _make_grad_hook(self, name: str, kind: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.enabled:
                return
            try:
                self.records.append(GradRecord(name, kind, len(self.records), tensor_stats(grad)))
            except _HOOK_ERRORS as exc:
                self._hook_failed(name, exc)
            # returning None leaves the gradient unchanged

        return hook

    def clear(self) -> None:
        """Forget the records and the per-forward tensor hooks (keep the module/param hooks)."""
        self.records.clear()
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def detach(self) -> None:
        """Remove every hook (the records stay readable)."""
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        super().detach()

    def to_host(self) -> list[dict[str, Any]]:
        """All records as ``{"name", "kind", "order", "stats": {stat: float}}``; ONE host sync."""
        if not self.records:
            return []
        dev = self.records[0].stats.device
        values = torch.stack([r.stats.to(dev) for r in self.records]).tolist()  # host sync
        return [
            {
                "name": r.name,
                "kind": r.kind,
                "order": r.order,
                "stats": dict(zip(STAT_NAMES, v, strict=True)),
            }
            for r, v in zip(self.records, values, strict=True)
        ]
