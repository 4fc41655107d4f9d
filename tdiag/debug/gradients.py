"""Gradient checks: exploding / vanishing across depth, parameters without a gradient,
units that never activate.

All four share one forward + backward of the training loss (``ctx.loss``) on the user's
model (``.grad`` fields put back afterwards), cached in ``ctx.cache`` under :data:`CACHE_KEY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tdiag.debug.probes import controlled
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

__all__ = ["GradPass", "grad_pass"]

CACHE_KEY = "gradients.pass"

#: Global gradient norm at init above which training will blow up without clipping. A
#: judgement: well-initialised Transformers give O(0.1-10) at init (GPT-2 small ~ 1-5), and
#: practitioners clip at 1.0; 1e3 is two orders of magnitude beyond anything healthy.
GRAD_NORM_EXPLODING = 1e3

#: A loss above this many times ln(vocab) at init is likely summed rather than averaged over
#: tokens (cross-entropy at init is ~ln(vocab) per token); the exploding finding says so.
SUMMED_LOSS_FACTOR = 10.0

#: Growth of the per-block gradient norm from the last block to the first (backward runs from
#: output to input) above which gradients explode with depth. A judgement: Pre-LN models keep
#: this ratio near 1; Post-LN models at init reach ~depth (Xiong et al. 2020); 100 is far beyond.
DEPTH_RATIO_EXPLODING = 100.0

#: Shrink of the per-block gradient norm from the last block to the first below which the
#: first blocks barely learn (the inverse judgement of DEPTH_RATIO_EXPLODING).
DEPTH_RATIO_VANISHING = 1e-2

#: Global gradient norm below which nothing learns at any sane learning rate (float32 noise level).
GRAD_NORM_VANISHING = 1e-7

#: Fraction of a layer's units that never activate on the whole batch above which it is a
#: warning / an error. At init a unit is dead on B*L tokens only if its pre-activation is
#: negative everywhere (e.g. a large negative bias): a healthy ReLU layer has ~0 such units.
DEAD_FRAC_WARNING = 0.05
DEAD_FRAC_ERROR = 0.5


class _ParamUse(TorchFunctionMode):
    """Records which parameters appear as an argument of any torch function in the forward."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.used: set[str] = set()

    def _scan(self, obj: Any, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            name = self.params.get(id(obj))
            if name is not None:
                self.used.add(name)
        elif depth < 2 and isinstance(obj, list | tuple):
            for o in obj:
                self._scan(o, depth + 1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._scan(args)
        self._scan(tuple(kwargs.values()))
        return func(*args, **kwargs)


@dataclass
class GradPass:
    """One forward + backward of the training loss.

    Attributes:
        loss: the loss value.
        grads: parameter name -> gradient (None: the parameter got no gradient).
        used: names of parameters seen as an argument of some op in the forward.
        alive: name of a weight-carrying layer -> bool per input unit (True: non-zero on some token).
        indicator: name -> 0-d bool tensor, True when every input value was 0 or 1 (a one-hot or
            multi-hot encoding, whose absent entries are not dead units).
        params: parameter name -> parameter (trainable ones only).
    """

    loss: float
    grads: dict[str, torch.Tensor | None]
    used: set[str]
    alive: dict[str, torch.Tensor] = field(default_factory=dict)
    indicator: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, nn.Parameter] = field(default_factory=dict)


def _alive_hook(
    alive: dict[str, torch.Tensor],
    indicator: dict[str, torch.Tensor],
    name: str,
    in_features: int,
) -> Any:
    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return
        if x.shape[-1] != in_features:
            return
        nz = (x.detach() != 0).reshape(-1, in_features).any(0)  # (in_features,)
        alive[name] = alive[name] | nz if name in alive else nz
        xd = x.detach()
        # 0/1 values with some 1s: an encoding, not activations (a dead layer is all 0s)
        binary = ((xd == 0) | (xd == 1)).all() & (xd == 1).any()  # on the device: no sync
        indicator[name] = indicator[name] & binary if name in indicator else binary

    return pre


def _in_features(m: nn.Module) -> int | None:
    """Input width of a layer applying a 2-D weight to its input's last dim (Linear, HF Conv1D)."""
    if isinstance(m, nn.Linear):
        return m.in_features
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[0]  # transformers.pytorch_utils.Conv1D: weight (in, out)
    return None


def _backward(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """Each parameter's gradient of ``loss`` (None: not reached); ``.grad`` fields restored.

    ``loss.backward()`` rather than ``torch.autograd.grad``: the latter fails on models that use
    reentrant activation checkpointing.
    """
    if not loss.requires_grad:
        return [None] * len(params)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def grad_pass(ctx: CheckContext) -> GradPass:
    """The shared forward + backward (cached). Train mode with a seeded RNG; the model's
    modes, buffers and ``.grad`` fields are left as they were."""
    if CACHE_KEY in ctx.cache:
        return ctx.cache[CACHE_KEY]
    model = ctx.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise SkipCheck("the model has no trainable parameter (all requires_grad=False)")
    alive: dict[str, torch.Tensor] = {}
    indicator: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        width = _in_features(m)
        if width is not None:
            handles.append(m.register_forward_pre_hook(_alive_hook(alive, indicator, name, width)))
    use = _ParamUse({id(p): n for n, p in params.items()})
    try:
        with controlled(model, train=True, seed=ctx.seed), torch.enable_grad():
            with use:
                loss = ctx.loss()
            grads = _backward(loss, list(params.values()))
    finally:
        for h in handles:
            h.remove()
    result = GradPass(
        loss=float(loss.detach()),  # host sync
        grads=dict(zip(params, grads, strict=True)),
        used=use.used,
        alive=alive,
        indicator=indicator,
        params=params,
    )
    ctx.cache[CACHE_KEY] = result
    return result


# -- per-block norms ---------------------------------------------------------------------------
def _norms(gp: GradPass) -> dict[str, float]:
    names = [n for n, g in gp.grads.items() if g is not None]
    if not names:
        return {}
    norms = torch._foreach_norm([gp.grads[n].detach().float() for n in names])  # type: ignore[union-attr]
    return dict(zip(names, torch.stack(norms).tolist(), strict=True))  # host sync


def _block_norms(ctx: CheckContext, norms: dict[str, float]) -> list[tuple[str, float]]:
    """``(block name, gradient norm over its parameters)`` in depth order."""
    out = []
    for bname, _ in ctx.block_modules():
        sq = [v * v for n, v in norms.items() if n.startswith(bname + ".")]
        if sq:
            out.append((bname, math.sqrt(sum(sq))))
    return out


def _depth_profile(ctx: CheckContext) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    gp = grad_pass(ctx)
    if not math.isfinite(gp.loss):
        raise SkipCheck(
            "the loss is not finite (see numerics.nonfinite-forward, data.labels-all-ignored)"
        )
    norms = _norms(gp)
    if not norms:
        raise SkipCheck("no parameter received a gradient (see grad.missing)")
    if not all(math.isfinite(v) for v in norms.values()):
        raise SkipCheck("gradients are not finite (see numerics.nonfinite-backward)")
    total = math.sqrt(sum(v * v for v in norms.values()))
    return norms, _block_norms(ctx, norms), total


def _ratio(blocks: list[tuple[str, float]]) -> float | None:
    """Gradient norm of the first block over that of the last (None: not comparable)."""
    if len(blocks) < 2 or blocks[-1][1] <= 0.0:
        return None
    return blocks[0][1] / blocks[-1][1]


def _top(norms: dict[str, float], k: int = 5, *, largest: bool = True) -> dict[str, float]:
    items = sorted(norms.items(), key=lambda kv: kv[1], reverse=largest)[:k]
    return dict(items)


@register_check("grad.exploding", family="gradients", title="Gradient norm exploding")
def check_exploding(ctx: CheckContext) -> list[Finding]:
    """Global gradient norm far too large at init, or growing by orders of magnitude with depth."""
    norms, blocks, total = _depth_profile(ctx)
    ratio = _ratio(blocks)
    evidence: dict[str, Any] = {
        "grad_norm": total,
        "threshold": GRAD_NORM_EXPLODING,
        "block_grad_norms": dict(blocks),
        "first_to_last_ratio": ratio,
        "largest_param_grad_norms": _top(norms),
    }
    recommendation = (
        "Clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) and add a "
        "learning-rate warmup; fix the cause too: initialise weights with std ~ 1/sqrt(fan_in) "
        "(0.02 for d_model ~ 768), scale residual output projections by 1/sqrt(2 * n_layers), "
        "use Pre-LN (norm inside the residual branch) and scale attention scores by 1/sqrt(d_k)."
    )
    if total > GRAD_NORM_EXPLODING:
        where = max(norms, key=norms.__getitem__)
        loss = grad_pass(ctx).loss
        evidence["loss"] = loss
        if ctx.vocab_size and loss > SUMMED_LOSS_FACTOR * math.log(ctx.vocab_size):
            recommendation = (
                f"The loss is {loss:.3g}, far above ln(vocab) = {math.log(ctx.vocab_size):.3g}: "
                "if it is summed over tokens, its gradient grows with the batch; average it "
                "(reduction='mean'). " + recommendation
            )
        return [
            Finding(
                id="grad.exploding",
                severity=Severity.ERROR,
                title="Gradient norm exploding at init",
                message=(
                    f"The global gradient norm at init is {total:.3g} (> {GRAD_NORM_EXPLODING:g}); "
                    f"largest on {where} ({norms[where]:.3g})."
                ),
                where=where,
                evidence=evidence,
                recommendation=recommendation,
            )
        ]
    if ratio is not None and ratio > DEPTH_RATIO_EXPLODING:
        return [
            Finding(
                id="grad.exploding",
                severity=Severity.ERROR,
                title="Gradient norm grows with depth",
                message=(
                    f"The gradient norm of {blocks[0][0]} is {ratio:.3g}x that of {blocks[-1][0]} "
                    f"(> {DEPTH_RATIO_EXPLODING:g}x): gradients grow as they flow back to the input."
                ),
                where=blocks[0][0],
                evidence=evidence,
                recommendation=recommendation,
            )
        ]
    return []


@register_check("grad.vanishing", family="gradients", title="Gradient norm vanishing")
def check_vanishing(ctx: CheckContext) -> list[Finding]:
    """Gradients that shrink by orders of magnitude from the last block to the first."""
    norms, blocks, total = _depth_profile(ctx)
    ratio = _ratio(blocks)
    evidence: dict[str, Any] = {
        "grad_norm": total,
        "block_grad_norms": dict(blocks),
        "first_to_last_ratio": ratio,
        "threshold_ratio": DEPTH_RATIO_VANISHING,
        "smallest_param_grad_norms": _top(norms, largest=False),
    }
    recommendation = (
        "Keep a residual connection around every attention and feed-forward sub-layer "
        "(x = x + f(norm(x))), use Pre-LN, avoid saturating activations (tanh/sigmoid) in deep "
        "stacks and too-small init (std ~ 1/sqrt(fan_in)); check that the output layer is not "
        "initialised to exactly zero."
    )
    if total < GRAD_NORM_VANISHING and gp_loss_positive(ctx):
        return [
            Finding(
                id="grad.vanishing",
                severity=Severity.ERROR,
                title="Gradients vanish",
                message=f"The global gradient norm is {total:.3g} (< {GRAD_NORM_VANISHING:g}).",
                evidence=evidence,
                recommendation=recommendation,
            )
        ]
    if len(blocks) < 2:
        raise SkipCheck("no repeated blocks (nn.ModuleList of layers) to compare across depth")
    if max(v for _, v in blocks) == 0.0:
        # e.g. a zero-initialised output layer (muP readout): only the head learns at step 0
        return [
            Finding(
                id="grad.vanishing",
                severity=Severity.WARNING,
                title="No gradient reaches the blocks at init",
                message=(
                    f"All {len(blocks)} blocks get an exactly zero gradient at init while other "
                    "parameters do not; usually a zero-initialised output layer."
                ),
                where=blocks[-1][0],
                evidence=evidence,
                recommendation=(
                    "Fine for one step if the output layer is zero-initialised on purpose; "
                    "otherwise initialise it small (std ~ 0.02) rather than zero."
                ),
            )
        ]
    assert ratio is not None
    if ratio < DEPTH_RATIO_VANISHING:
        return [
            Finding(
                id="grad.vanishing",
                severity=Severity.ERROR,
                title="Gradient norm vanishes with depth",
                message=(
                    f"The gradient norm of {blocks[0][0]} is {ratio:.3g}x that of {blocks[-1][0]} "
                    f"(< {DEPTH_RATIO_VANISHING:g}x): the first layers barely learn."
                ),
                where=blocks[0][0],
                evidence=evidence,
                recommendation=recommendation,
            )
        ]
    return []


def gp_loss_positive(ctx: CheckContext) -> bool:
    loss = grad_pass(ctx).loss
    return math.isfinite(loss) and loss > 1e-6


@register_check("grad.missing", family="gradients", title="Trainable parameter without gradient")
def check_missing(ctx: CheckContext) -> list[Finding]:
    """Parameters with ``requires_grad=True`` that the loss does not reach."""
    gp = grad_pass(ctx)
    missing = [n for n, g in gp.grads.items() if g is None]
    if not missing:
        return []
    detached = [n for n in missing if n in gp.used]
    unused = [n for n in missing if n not in gp.used]
    findings = []
    if detached:
        findings.append(
            Finding(
                id="grad.missing",
                severity=Severity.ERROR,
                title="Parameters are used but get no gradient (detached)",
                message=(
                    f"{len(detached)} trainable parameter(s) take part in the forward pass but the "
                    f"loss does not depend on them through autograd: {', '.join(detached[:8])}"
                    + (" ..." if len(detached) > 8 else "")
                ),
                where=_owner(detached[0]),
                evidence={"parameters": detached, "numel": _numel(gp, detached)},
                recommendation=(
                    "Look for .detach(), .data, torch.no_grad() or a conversion to Python/NumPy "
                    "on the path from these parameters to the loss. If they are frozen on purpose, "
                    "set requires_grad=False on them instead."
                ),
            )
        )
    if unused:
        findings.append(
            Finding(
                id="grad.missing",
                severity=Severity.WARNING,
                title="Parameters are never used in the forward pass",
                message=(
                    f"{len(unused)} trainable parameter(s) are never used by the forward pass: "
                    f"{', '.join(unused[:8])}" + (" ..." if len(unused) > 8 else "")
                ),
                where=_owner(unused[0]),
                evidence={"parameters": unused, "numel": _numel(gp, unused)},
                recommendation=(
                    "Remove the unused layers or call them in forward(). Unused parameters waste "
                    "memory and optimizer state, and DistributedDataParallel fails on them unless "
                    "find_unused_parameters=True (which costs a graph traversal per step)."
                ),
            )
        )
    return findings


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _numel(gp: GradPass, names: list[str]) -> int:
    return sum(gp.params[n].numel() for n in names)


@register_check("grad.dead-units", family="gradients", title="Units that never activate")
def check_dead_units(ctx: CheckContext) -> list[Finding]:
    """Hidden units (inputs of a Linear layer) that are exactly zero on every token of the batch."""
    gp = grad_pass(ctx)
    if not gp.alive:
        raise SkipCheck("no Linear layer saw a floating-point input")
    names = list(gp.alive)
    values = torch.stack(
        [(~gp.alive[n]).float().mean() for n in names] + [gp.indicator[n].float() for n in names]
    ).tolist()  # host sync
    dead, binary = values[: len(names)], values[len(names) :]
    # a layer fed one-hot/multi-hot inputs (e.g. F.one_hot(ids) @ W) has absent entries, not
    # dead units
    names_dead = [(n, d) for n, d, b in zip(names, dead, binary, strict=True) if b == 0.0]
    rows = [
        (n, frac, int(gp.alive[n].numel())) for n, frac in names_dead if frac > DEAD_FRAC_WARNING
    ]
    if not rows:
        return []
    worst = max(rows, key=lambda r: r[1])
    severity = Severity.ERROR if worst[1] > DEAD_FRAC_ERROR else Severity.WARNING
    return [
        Finding(
            id="grad.dead-units",
            severity=severity,
            title="Units that never activate",
            message=(
                f"{worst[1]:.0%} of the {worst[2]} input units of {worst[0]} are exactly zero on every "
                f"token of the batch (dead: no gradient flows back through them)"
                + (f"; {len(rows) - 1} more layer(s) affected." if len(rows) > 1 else ".")
            ),
            where=worst[0],
            evidence={
                "dead_fraction": {n: f for n, f, _ in rows},
                "units": {n: u for n, _, u in rows},
                "tokens": int(ctx.input_ids.numel()),
                "threshold": DEAD_FRAC_WARNING,
            },
            recommendation=(
                "Check the layer before the activation: a large negative bias or too large an "
                "init pushes pre-activations below zero everywhere. Initialise biases to zero and "
                "weights with std ~ 1/sqrt(fan_in); use GELU/SiLU (or SwiGLU) instead of ReLU; "
                "lower the learning rate or add warmup if units die during training."
            ),
        )
    ]
