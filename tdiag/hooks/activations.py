"""Forward hooks recording activation statistics per module call, on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdiag.hooks.common import (
    _HOOK_ERRORS,
    ModuleFilter,
    _default_filter,
    _HookOwner,
    first_float_tensor,
)
from tdiag.stats import STAT_NAMES, tensor_stats

__all__ = ["ActivationRecorder", "ModuleRecord"]


@dataclass
class ModuleRecord:
    """One forward call of one module.

    Attributes:
        name: the module's path in ``named_modules()``.
        cls_name: the module's class name.
        order: 0-based index of this call in execution (completion) order.
        out_stats: ``Tensor[4]`` (see ``tdiag.stats.STAT_NAMES``) of the first floating output.
        in_stats: ``Tensor[4]`` of the first floating input, when recorded, else None.
    """

    name: str
    cls_name: str
    order: int
    out_stats: torch.Tensor
    in_stats: torch.Tensor | None = None


class ActivationRecorder(_HookOwner):
    """Forward hooks recording activation statistics per module call, on the device.

    Args:
        model: the model; hooks go on ``model.named_modules()`` passing ``module_filter``.
        module_filter: ``(name, module) -> bool``; default: every submodule except the root.
        inputs: also record the statistics of each module's first floating input.

    Usage::

        with ActivationRecorder(model, inputs=True) as rec:
            model(x)
        rows = rec.to_host()   # one host sync
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        module_filter: ModuleFilter | None = None,
        inputs: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.module_filter = module_filter or _default_filter
        self.inputs = inputs
        self.records: list[ModuleRecord] = []

    def attach(self) -> ActivationRecorder:
        """Register the forward hooks (no-op when already attached)."""
        if self._handles:
            return self
        for name, module in self.model.named_modules():
            if self.module_filter(name, module):
                self._handles.append(
                    module.register_forward_hook(self._make_hook(name, module), with_kwargs=True)
                )
        return self

    def _make_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        cls_name = type(module).__name__

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.enabled:
                return
            try:
                out = first_float_tensor(output)
                if out is None:
                    return
                in_stats = None
                if self.inputs:
                    inp = first_float_tensor(args)
                    if inp is None:
                        inp = first_float_tensor(kwargs)
                    in_stats = tensor_stats(inp) if inp is not None else None
                self.records.append(
                    ModuleRecord(name, cls_name, len(self.records), tensor_stats(out), in_stats)
                )
            except _HOOK_ERRORS as exc:
                self._hook_failed(name, exc)

        return hook

    def clear(self) -> None:
        """Forget the records (keep the hooks)."""
        self.records.clear()

    def to_host(self) -> list[dict[str, Any]]:
        """All records as dicts, with ONE host sync.

        Returns:
            ``[{"name", "cls_name", "order", "out": {stat: float}, "in": {stat: float}|None}]``.
        """
        if not self.records:
            return []
        tensors = [r.out_stats for r in self.records]
        has_in = [r.in_stats is not None for r in self.records]
        tensors += [r.in_stats for r in self.records if r.in_stats is not None]
        values = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()  # host sync
        n = len(self.records)
        ins = iter(values[n:])
        rows = []
        for r, v, hi in zip(self.records, values[:n], has_in, strict=True):
            rows.append(
                {
                    "name": r.name,
                    "cls_name": r.cls_name,
                    "order": r.order,
                    "out": dict(zip(STAT_NAMES, v, strict=True)),
                    "in": dict(zip(STAT_NAMES, next(ins), strict=True)) if hi else None,
                }
            )
        return rows
