"""Numerics checks: NaN/Inf in parameters, forward and backward; fp16 range.

Non-finite values are detected from reductions already computed per tensor
(``tdiag.stats.tensor_stats``), with one host sync per pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity
from tdiag.hooks import GradientRecorder
from tdiag.hooks.locate import first_nonfinite_backward, first_nonfinite_forward, first_nonfinite_op
from tdiag.hooks.ops import OpTracer
from tdiag.stats import STAT_NAMES, tensor_stats

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: Largest finite float16 value: an activation beyond it becomes Inf under fp16 autocast
#: (IEEE 754 half precision: (2 - 2^-10) * 2^15).
FP16_MAX = 65504.0
#: How many modules a finding lists.
MAX_LISTED = 10

_NAN_CAUSES = (
    "Usual causes: log/sqrt/division of zero or a negative (add an eps: LayerNorm eps, "
    "x.clamp_min(eps).log()), a softmax row with every position masked (-inf everywhere gives "
    "0/0: use a large finite negative like torch.finfo(dtype).min, or keep one key per query), "
    "overflow in fp16 (use bf16), or NaN/Inf already in a parameter or buffer."
)


@register_check(
    "numerics.nonfinite-param", family="numerics", title="NaN/Inf in parameters or buffers"
)
def nonfinite_param(ctx: CheckContext) -> list[Finding]:
    params = [(n, t) for n, t in ctx.model.named_parameters() if t.is_floating_point()]
    # Buffers may hold -inf on purpose (a float causal mask from
    # nn.Transformer.generate_square_subsequent_mask): only NaN is a fault there.
    buffers = [(n, t) for n, t in ctx.model.named_buffers() if t.is_floating_point()]
    if not params and not buffers:
        raise SkipCheck("the model has no floating parameters or buffers")
    flags = [tensor_stats(t)[0] for _, t in params]
    flags += [(~torch.isnan(t).any()).float() for _, t in buffers]
    finite = torch.stack(flags).tolist()  # host sync
    named = params + buffers
    bad = [n for (n, _), f in zip(named, finite, strict=True) if f == 0.0]
    if not bad:
        return []
    return [
        Finding(
            id="numerics.nonfinite-param",
            severity=Severity.ERROR,
            title="Parameters contain NaN or Inf",
            message=f"{len(bad)} parameter/buffer tensor(s) hold non-finite values, first {bad[0]}.",
            where=bad[0],
            evidence={"tensors": bad[:MAX_LISTED], "count": len(bad)},
            recommendation=(
                "Look at how these tensors are initialised or loaded (a checkpoint saved after "
                "a divergence, an init dividing by zero such as std = 1/sqrt(0)); reinitialise "
                "or load an earlier checkpoint."
            ),
        )
    ]


def _named_stats(row: dict[str, Any] | None) -> dict[str, float] | None:
    return None if row is None else {k: row[k] for k in STAT_NAMES}


def _forward_op(ctx: CheckContext) -> dict[str, Any] | None:
    """The op whose output first goes non-finite in the check's forward (a second forward,
    under :class:`~tdiag.hooks.ops.OpTracer`, run only once a fault was found)."""
    torch.manual_seed(ctx.seed)
    with OpTracer(ctx.model, backward=False) as tracer, torch.no_grad():
        ctx.call_model()
    return first_nonfinite_op(tracer.to_host(), "forward")


def _backward_op(ctx: CheckContext, params: list[torch.Tensor]) -> dict[str, Any] | None:
    """The backward node that first turns a finite gradient non-finite (its forward op and
    that op's input statistics), from a traced forward + backward."""
    torch.manual_seed(ctx.seed)
    with torch.enable_grad():
        with OpTracer(ctx.model) as tracer:
            loss = ctx.loss()
        torch.autograd.grad(loss, params, allow_unused=True)
    trace = tracer.to_host()
    op = first_nonfinite_op(trace, "backward")
    if op is None:
        return None
    return {**op, "in": trace["forward"][op["op_index"]]["in"]}


@register_check(
    "numerics.nonfinite-forward", family="numerics", title="NaN/Inf appears in the forward pass"
)
def nonfinite_forward(ctx: CheckContext) -> list[Finding]:
    rec = ctx.recorded_forward()
    rows = rec["rows"]
    logits_finite = bool(torch.isfinite(rec["logits"].float().sum()))  # host sync
    bad = [r for r in rows if r["out"]["finite"] == 0.0]
    if not bad and logits_finite:
        return []
    # first module, in execution order, whose output is non-finite while its input was finite
    # (tdiag.hooks.locate: the same answer the Monitor's replay gives)
    origin = first_nonfinite_forward(rows)
    op = _forward_op(ctx)
    if origin is None:
        where, what = None, "in code outside any submodule (the model's own forward)"
    else:
        where, what = origin["name"], f"in {origin['name']} ({origin['cls_name']})"
    return [
        Finding(
            id="numerics.nonfinite-forward",
            severity=Severity.ERROR,
            title="NaN/Inf appears in the forward pass",
            message=(
                f"The forward pass first produces non-finite values {what}, whose input was "
                f"finite; {len(bad)} module output(s) are non-finite in all"
                f"{'' if logits_finite else ', and so are the logits'}."
            ),
            where=where,
            evidence={
                "module_class": origin["cls_name"] if origin else None,
                "input": _named_stats(origin["in"]) if origin else None,
                "output": _named_stats(origin["out"]) if origin else None,
                "nonfinite_modules": [r["name"] for r in bad[:MAX_LISTED]],
                "logits_finite": logits_finite,
                "op": op["op"] if op else None,
                "op_input": _named_stats(op["in"]) if op else None,
            },
            recommendation=f"Inspect the forward of {where or 'the model'}. {_NAN_CAUSES}",
        )
    ]


@register_check(
    "numerics.nonfinite-backward",
    family="numerics",
    title="NaN/Inf appears in the backward pass",
)
def nonfinite_backward(ctx: CheckContext) -> list[Finding]:
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    if not params:
        raise SkipCheck("no trainable parameters")
    torch.manual_seed(ctx.seed)
    with GradientRecorder(ctx.model, inputs=True) as rec, torch.enable_grad():
        loss = ctx.loss()
        if not loss.requires_grad:
            raise SkipCheck("the loss depends on no trainable parameter (see grad.missing)")
        if not bool(torch.isfinite(loss.detach().float())):  # host sync
            raise SkipCheck("the loss is already non-finite (see numerics.nonfinite-forward)")
        # autograd.grad leaves every .grad untouched; the recorder's hooks still fire
        torch.autograd.grad(loss, params, allow_unused=True)
    rows = rec.to_host()
    found = first_nonfinite_backward(rows)  # tdiag.hooks.locate, shared with the replay
    if found is None:
        return []
    first, last_ok = found, found["last_finite_module"]
    bad = [r for r in rows if r["stats"]["finite"] == 0.0]
    op = _backward_op(ctx, params)
    return [
        Finding(
            id="numerics.nonfinite-backward",
            severity=Severity.ERROR,
            title="NaN/Inf appears in the backward pass",
            message=(
                f"The loss is finite but its gradient is not: the first non-finite gradient "
                f"reaches {first['kind']} {first['name']}"
                + (f" (the last finite one was at {last_ok})" if last_ok else "")
                + f"; {len(bad)} gradient(s) are non-finite."
                + (f" The op: {op['op']} in {op['module'] or 'the loss'}." if op else "")
            ),
            where=first["name"],
            evidence={
                "kind": first["kind"],
                "grad": first["stats"],
                "last_finite_module": last_ok,
                "culprit": found["culprit"],
                "op": f"{op['op']} ({op['node']})" if op else None,
                "op_input": _named_stats(op["in"]) if op else None,
                "nonfinite": [r["name"] for r in bad[:MAX_LISTED]],
            },
            recommendation=(
                "A forward op with an infinite derivative at the values it sees sits between "
                f"{first['name']} and {last_ok or 'the loss'}: sqrt(x) or x.norm() at 0 (use "
                "sqrt(x + eps)), pow with a fractional exponent at 0, log near 0, a custom "
                "autograd.Function, or masked_fill/where that keeps a NaN branch (torch.where "
                "differentiates both branches: sanitise the input first). "
                "torch.autograd.set_detect_anomaly(True) names the op."
            ),
        )
    ]


@register_check(
    "numerics.fp16-overflow-risk",
    family="numerics",
    title="Activations beyond the float16 range",
)
def fp16_overflow_risk(ctx: CheckContext) -> list[Finding]:
    rows = ctx.recorded_forward()["rows"]
    over = [
        r for r in rows if math.isfinite(r["out"]["abs_max"]) and r["out"]["abs_max"] > FP16_MAX
    ]
    if not over:
        return []
    top = sorted(over, key=lambda r: -r["out"]["abs_max"])[:MAX_LISTED]
    return [
        Finding(
            id="numerics.fp16-overflow-risk",
            severity=Severity.WARNING,
            title="Activations exceed the float16 range",
            message=(
                f"{len(over)} module output(s) exceed {FP16_MAX:g} (float16's largest value), "
                f"first {over[0]['name']} with max |x| {over[0]['out']['abs_max']:.3g}: under "
                "fp16 mixed precision they become Inf, then NaN."
            ),
            where=over[0]["name"],
            evidence={
                "fp16_max": FP16_MAX,
                "modules": {r["name"]: r["out"]["abs_max"] for r in top},
            },
            recommendation=(
                "Train in bfloat16 (fp32's range) instead of float16, or keep these modules in "
                "fp32; better, find why activations are this large (init scale, missing norm, "
                "see init.activation-growth). A GradScaler does not help: it scales gradients, "
                "not activations."
            ),
        )
    ]
