"""Op tracer: every torch op of a forward, with its module and statistics, and the backward
node each op made — to name the op where a value first went non-finite, forward or backward.

A ``TorchFunctionMode`` sees the torch functions and ``Tensor`` methods the model calls
(``F.linear``, ``x.sqrt()``, ``a @ b`` …; the calls those make internally are not seen, so
each record is an op the user's code wrote). Per op it keeps the statistics of its floating
inputs (combined: finite if all are, the largest ``abs_max``) and of its output, and, with
``backward=True``, puts a hook on the output's ``grad_fn`` node that records whether the
gradient flowing into the node was finite and whether the gradients it produced are.

Costly (five reductions per op, a hook per node): for the replay of one step and for
``tdiag check`` once a non-finite value has been found, never for a healthy training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdiag.hooks.common import _HOOK_ERRORS, ModuleStackMode, _one_line, logger
from tdiag.stats import STAT_NAMES, tensor_stats

__all__ = ["BackwardRecord", "OpRecord", "OpTracer"]

# Tensor attribute reads and metadata calls that are not ops (cheap to skip by name).
_NOT_OPS = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_floating_point", "is_complex", "__len__"}
)


@dataclass
class OpRecord:
    """One op of the traced forward.

    Attributes:
        index: 0-based order of the call.
        op: the op's name (``linear``, ``sqrt``, ``mul`` for ``a * b``).
        module: the innermost named module running it (None: outside any, or no model given).
        in_stats: ``Tensor[4]`` (``tdiag.stats.STAT_NAMES``) over the floating inputs:
            ``finite`` of all of them, the largest ``abs_max``, ``rms`` and ``zero_frac`` of
            the first; None when the op had no floating input.
        out_stats: ``Tensor[4]`` of the (first) floating output.
    """

    index: int
    op: str
    module: str | None
    in_stats: torch.Tensor | None
    out_stats: torch.Tensor


@dataclass
class BackwardRecord:
    """One backward node of a traced op, as backward ran it.

    Attributes:
        order: 0-based order in which backward ran the nodes.
        op_index: the :class:`OpRecord` whose output the node belongs to.
        node: the node's name (``SqrtBackward0``).
        grad_in: ``Tensor[4]`` of the gradient flowing into the node (w.r.t. the op's output).
        grad_out: ``Tensor[4]`` over the gradients the node produced (w.r.t. the op's inputs):
            ``finite`` of all, the largest ``abs_max``.
    """

    order: int
    op_index: int
    node: str
    grad_in: torch.Tensor
    grad_out: torch.Tensor


def _float_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if depth < 2 and isinstance(obj, list | tuple):
        return [t for v in obj for t in _float_tensors(v, depth + 1)]
    if depth < 2 and isinstance(obj, dict):
        return [t for v in obj.values() for t in _float_tensors(v, depth + 1)]
    return []


def _combined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Stats of the first tensor, with ``finite`` of all and the largest ``abs_max``."""
    if not tensors:
        return None
    stats = [tensor_stats(t) for t in tensors]
    if len(stats) == 1:
        return stats[0]
    dev = stats[0].device
    stacked = torch.stack([s.to(dev) for s in stats])  # (n, 4)
    first = stacked[0].clone()
    first[0] = stacked[:, 0].min()
    first[1] = stacked[:, 1].max()
    return first


def _op_name(func: Any) -> str:
    return str(getattr(func, "__name__", func)).strip("_") or str(func)


class OpTracer(ModuleStackMode):
    """Record every op of the forward run inside the ``with`` block (and, ``backward=True``,
    its backward node).

    Args:
        model: when given, the innermost running named module is recorded per op.
        backward: hook each op's ``grad_fn`` node to record the gradients through it.

    Usage::

        with OpTracer(model) as tr:
            loss = loss_fn(model, batch)
        loss.backward()            # the node hooks fire here
        rows = tr.to_host()        # one host sync
    """

    def __init__(self, model: nn.Module | None = None, *, backward: bool = True) -> None:
        super().__init__(model, skip_root=True)
        self.backward = backward
        self.records: list[OpRecord] = []
        self.backward_records: list[BackwardRecord] = []
        self.errors = 0
        self._nodes: set[int] = set()

    # -- interception ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _NOT_OPS:
            return out
        try:
            self._record(name, args, kwargs, out)
        except _HOOK_ERRORS as exc:
            if self.errors == 0:
                logger.warning("tdiag op tracer could not record %s (%s)", name, _one_line(exc))
            self.errors += 1
        return out

    def _record(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outs = _float_tensors(out)
        if not outs:
            return
        with torch.no_grad():
            in_stats = _combined(_float_tensors(args) + _float_tensors(kwargs))
            rec = OpRecord(
                len(self.records),
                name,
                self._stack[-1] if self._stack else None,
                in_stats,
                tensor_stats(outs[0]),
            )
        self.records.append(rec)
        node = outs[0].grad_fn
        if self.backward and node is not None and id(node) not in self._nodes:
            self._nodes.add(id(node))
            node.register_hook(self._node_hook(rec.index, node.name()))

    def _node_hook(self, op_index: int, node_name: str) -> Callable[..., None]:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            try:
                g_in = _combined([g for g in grad_outputs if g is not None])
                g_out = _combined([g for g in grad_inputs if g is not None])
                if g_in is None or g_out is None:
                    return
                self.backward_records.append(
                    BackwardRecord(len(self.backward_records), op_index, node_name, g_in, g_out)
                )
            except _HOOK_ERRORS as exc:
                if self.errors == 0:
                    logger.warning(
                        "tdiag op tracer could not record %s (%s)", node_name, _one_line(exc)
                    )
                self.errors += 1

        return hook

    def to_host(self) -> dict[str, list[dict[str, Any]]]:
        """``{"forward": [{"index", "op", "module", "in", "out"}], "backward": [{"order",
        "op_index", "op", "module", "node", "grad_in", "grad_out"}]}`` (stats as dicts of
        ``STAT_NAMES``; ``in`` None without floating input), with ONE host sync."""
        tensors: list[torch.Tensor] = []
        for r in self.records:
            tensors.append(r.out_stats)
            if r.in_stats is not None:
                tensors.append(r.in_stats)
        for b in self.backward_records:
            tensors += [b.grad_in, b.grad_out]
        if not tensors:
            return {"forward": [], "backward": []}
        dev = tensors[0].device
        values = iter(torch.stack([t.to(dev) for t in tensors]).tolist())  # host sync

        def named() -> dict[str, float]:
            return dict(zip(STAT_NAMES, next(values), strict=True))

        forward = []
        for r in self.records:
            out = named()
            forward.append(
                {
                    "index": r.index,
                    "op": r.op,
                    "module": r.module,
                    "out": out,
                    "in": named() if r.in_stats is not None else None,
                }
            )
        backward = []
        for b in self.backward_records:
            grad_in, grad_out = named(), named()
            rec = self.records[b.op_index]
            backward.append(
                {
                    "order": b.order,
                    "op_index": b.op_index,
                    "op": rec.op,
                    "module": rec.module,
                    "node": b.node,
                    "grad_in": grad_in,
                    "grad_out": grad_out,
                }
            )
        return {"forward": forward, "backward": backward}
