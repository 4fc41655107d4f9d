"""Per-layer statistics of a replayed step, and which layer's statistic moved first at a spike.

For a loss spike the replay runs the step before the spike and the spike step once more each
(no update, on the state each had in the run) and records, per *layer*:

- ``attn_max_logit``: the max pre-softmax attention score of the layer's attention calls
  (:class:`tdiag.hooks.attention.AttentionCapture`: ``F.scaled_dot_product_attention``,
  an eager softmax over the last dim, ``nn.MultiheadAttention``); absent for a layer with
  no attention, and for a model whose attention the capture does not see;
- ``log_z``: the mean over tokens of ``logsumexp`` of the model's output logits (the root
  module's output, or its ``.logits`` / ``["logits"]``; last dim >= 2), on the layer that
  produced them (``lm_head``), else on a row named ``output``;
- ``grad_norm``: the L2 norm of the layer's parameter gradients (float64).

A *layer* is a child of an ``nn.ModuleList`` / ``nn.ModuleDict`` (a Transformer block,
``blocks.0``), or else a child of the root (recursively into the children that hold such a
list: ``transformer.h.0`` in an HF GPT-2, and ``transformer.wte`` beside it).

:func:`compare` divides the spike's value by the healthy one's (absolute values; ``inf``
when the healthy one is 0 and the spike's is not; a non-finite spike value counts as moved)
and names the first statistic, in the order the step computes them, whose ratio is at least
:data:`MOVED_FACTOR`: the forward's statistics in forward order (each layer's attention max
logit, then log Z at the output), then the gradient norms in the order backward produced
them (the output's layer first).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["MOVED_FACTOR", "STATISTICS", "LayerProbe", "compare", "layer_names", "layer_of"]

#: A statistic "moved" when its spike value is at least this many times the healthy one's
#: (the same factor as the max |output| comparison of the spike replay).
MOVED_FACTOR = 2.0
#: The statistics recorded per layer, in the columns of the table.
STATISTICS = ("attn_max_logit", "log_z", "grad_norm")
#: The row of ``log_z`` when no layer's output is the model's output.
OUTPUT_ROW = "output"

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _holds_container(module: nn.Module) -> bool:
    return any(isinstance(m, _CONTAINERS) for m in module.modules())


def layer_names(model: nn.Module) -> list[str]:
    """The model's layers (see the module docstring), in ``named_modules`` order."""
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS):
                out.extend(f"{full}.{n}" for n, _ in child.named_children())
            elif _holds_container(child):
                walk(child, f"{full}.")
            else:
                out.append(full)

    walk(model, "")
    return out


def layer_of(name: str | None, layers: list[str]) -> str | None:
    """The layer holding module or parameter ``name`` (the longest layer prefix), or None."""
    if name is None:
        return None
    best = None
    for layer in layers:
        if (name == layer or name.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    return best


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, dict):
        output = output.get("logits")
    elif isinstance(output, tuple | list):
        output = output[0] if output else None
    elif not isinstance(output, torch.Tensor):
        output = getattr(output, "logits", None)
    if (
        isinstance(output, torch.Tensor)
        and output.is_floating_point()
        and output.dim() >= 2
        and output.shape[-1] >= 2
    ):
        return output
    return None


class LayerProbe:
    """Hooks for one replayed forward/backward: the layers' forward order, the attention
    max logits (``capture``: an :class:`AttentionCapture` entered around the forward), the
    output's log Z and (after backward) the per-layer gradient norms in backward order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = layer_names(model)
        self.forward_order: list[str] = []
        self.backward_order: list[str] = []
        self._out_of: dict[int, str] = {}  # id(output tensor) -> the layer that returned it
        self.log_z: torch.Tensor | None = None
        self.log_z_layer: str | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> LayerProbe:
        modules = dict(self.model.named_modules())
        for name in self.layers:
            mod = modules[name]
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        self._handles.append(self.model.register_forward_hook(self._root))
        for pname, p in self.model.named_parameters():
            layer = layer_of(pname, self.layers)
            if p.requires_grad and layer is not None:
                self._handles.append(p.register_hook(self._grad(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if name not in self.forward_order:
                self.forward_order.append(name)

        return hook

    def _post(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self._out_of[id(out)] = name

        return hook

    def _root(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.log_z is not None:  # the first forward of the step
            return
        logits = _logits(out)
        if logits is None:
            return
        with torch.no_grad():
            self.log_z = torch.logsumexp(logits.detach().float(), dim=-1).mean()
        self.log_z_layer = self._out_of.get(id(logits), OUTPUT_ROW)

    def _grad(self, layer: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if layer not in self.backward_order:
                self.backward_order.append(layer)

        return hook

    def to_host(self, capture: Any) -> dict[str, Any]:
        """The statistics as host floats (one sync): ``{"forward_order", "backward_order",
        "stats": {layer: {statistic: value}}}``. Gradient norms from the ``.grad`` the
        backward left (call before they are zeroed)."""
        tensors: list[torch.Tensor] = []
        keys: list[tuple[str, str, str]] = []  # (layer, statistic, combine)
        for call in getattr(capture, "calls", []):
            layer = layer_of(call.module_name, self.layers)
            if layer is not None and call.max_logit is not None:
                tensors.append(call.max_logit.detach().float().reshape(()))
                keys.append((layer, "attn_max_logit", "max"))
        if self.log_z is not None:
            tensors.append(self.log_z.reshape(()))
            keys.append((self.log_z_layer or OUTPUT_ROW, "log_z", "set"))
        for pname, p in self.model.named_parameters():
            layer = layer_of(pname, self.layers)
            if p.grad is not None and layer is not None:
                tensors.append(p.grad.detach().double().square().sum().reshape(()))
                keys.append((layer, "grad_norm", "sum"))
        stats: dict[str, dict[str, float]] = {}
        if tensors:
            dev = tensors[0].device
            values = torch.stack([t.double().to(dev) for t in tensors]).tolist()  # host sync
            for (layer, stat, how), v in zip(keys, values, strict=True):
                row = stats.setdefault(layer, {})
                if how == "max":
                    row[stat] = max(row.get(stat, -math.inf), v) if v == v else v
                elif how == "sum":
                    row[stat] = row.get(stat, 0.0) + v
                else:
                    row[stat] = v
            for row in stats.values():
                if "grad_norm" in row:
                    row["grad_norm"] = math.sqrt(row["grad_norm"])
        return {
            "forward_order": list(self.forward_order),
            "backward_order": list(self.backward_order),
            "stats": stats,
        }


def _ratio(spike: float, healthy: float) -> float:
    if not math.isfinite(spike):
        return math.inf
    a, b = abs(spike), abs(healthy)
    if not math.isfinite(b):
        return 0.0
    if b == 0.0:
        return math.inf if a > 0 else 1.0
    return a / b


def compare(
    healthy: dict[str, Any], spike: dict[str, Any], *, factor: float = MOVED_FACTOR
) -> dict[str, Any]:
    """Spike over healthy, per layer and statistic.

    Returns ``{"factor", "table": [{"layer", "attn_max_logit", "log_z", "grad_norm"}]``
    (ratios, None where the layer has no such statistic; rows in model order: the spike
    step's forward order, then layers that did not run) ``, "moved_first": {"layer",
    "statistic", "healthy", "spike", "ratio"} or None}`` (see the module docstring).
    """
    hs, ss = healthy.get("stats", {}), spike.get("stats", {})
    order = list(spike.get("forward_order", []))
    order += [n for n in healthy.get("forward_order", []) if n not in order]
    order += [n for n in ss if n not in order]
    ratios: dict[tuple[str, str], float] = {}
    for layer in order:
        for stat in STATISTICS:
            s, h = ss.get(layer, {}).get(stat), hs.get(layer, {}).get(stat)
            if s is not None and h is not None:
                ratios[(layer, stat)] = _ratio(s, h)
    table = [
        {"layer": layer, **{stat: ratios.get((layer, stat)) for stat in STATISTICS}}
        for layer in order
        if any((layer, stat) in ratios for stat in STATISTICS)
    ]
    # the order the step computes them: forward (attention per layer, log Z at the output),
    # then backward (gradient norms as backward produced them)
    sequence = [(layer, stat) for layer in order for stat in ("attn_max_logit", "log_z")]
    sequence += [(layer, "log_z") for layer in ss if (layer, "log_z") not in sequence]
    back = list(spike.get("backward_order", []))
    back += [n for n in reversed(order) if n not in back]
    sequence += [(layer, "grad_norm") for layer in back]
    moved = None
    for key in sequence:
        r = ratios.get(key)
        if r is not None and not r < factor:
            layer, stat = key
            moved = {
                "layer": layer,
                "statistic": stat,
                "healthy": hs[layer][stat],
                "spike": ss[layer][stat],
                "ratio": r,
            }
            break
    return {"factor": factor, "table": table, "moved_first": moved}
