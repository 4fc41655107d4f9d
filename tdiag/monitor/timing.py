"""Per-rank forward ("compute") time of the log step, for naming a straggler under DDP.

Under DDP the gradient all-reduce runs inside ``backward()``: a fast rank's backward and
step times absorb the wait for a slow one, so step times even out across ranks. The
forward pass has no collective (the timer sits on the module inside the DDP wrapper, past
its buffer broadcast), so its wall time is this rank's own compute. Measured on log steps
only (the Monitor arms the timer with its other probes): on CPU with ``perf_counter``,
on CUDA with events, read at the log step.

Key: ``host/compute_time`` in the log step's batch -> ``dist/compute_time/<r>``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

__all__ = ["ForwardTimer", "inner_module"]


def inner_module(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, DistributedDataParallel | DataParallel):
        return model.module
    return model


class ForwardTimer:
    """Wall time of the training forwards (grad enabled) of the armed step, summed over
    micro-batches. The hooks exist while armed only (from :meth:`arm` to :meth:`seconds` /
    :meth:`remove`): between log steps the model carries none."""

    def __init__(
        self, model: nn.Module, device: torch.device | None = None, *, site: Any = None
    ) -> None:
        self.armed = False
        self._cuda = device is not None and device.type == "cuda"
        self._t0: float | None = None
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None
        self._module = inner_module(model)
        self._site = site  # a ForwardSite: also the child forwards a loop calls directly
        self._handles: list[Any] = []

    def arm(self) -> None:
        self.armed, self._t0, self._seconds, self._events, self._start = True, None, 0.0, [], None
        if not self._handles:
            self._handles = [
                self._module.register_forward_pre_hook(self._pre),
                self._module.register_forward_hook(self._post),
            ]
            if self._site is not None:
                self._handles.append(self._site.listen(self._pre, self._post))

    def disarm(self) -> None:
        self.armed = False
        self.remove()

    def _pre(self, module: nn.Module, args: Any) -> None:
        if not self.armed or not torch.is_grad_enabled():
            return
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.armed or not torch.is_grad_enabled():
            return
        if self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
            self._start = None
        elif self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
            self._t0 = None

    def seconds(self) -> float | None:
        """The armed step's forward seconds (None: no training forward seen); disarms.
        With CUDA events this waits for the last one (the log step syncs anyway)."""
        self.disarm()
        total = self._seconds
        if self._events:
            self._events[-1][1].synchronize()
            total += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        seen = bool(self._events) or self._seconds > 0
        self._events, self._seconds = [], 0.0
        return total if seen else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
