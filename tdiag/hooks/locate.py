"""The one way of naming where a value first went non-finite, from what the collectors
recorded. Used by ``tdiag check`` (``tdiag.debug.numerics``) and by the Monitor's replay
(``tdiag.forensics.replay``): both say the same thing about the same pass.

Inputs are the host rows of :meth:`ActivationRecorder.to_host` (forward),
:meth:`GradientRecorder.to_host` (backward) and :meth:`OpTracer.to_host` (ops).
"""

from __future__ import annotations

from typing import Any

__all__ = ["first_nonfinite_backward", "first_nonfinite_forward", "first_nonfinite_op"]

Row = dict[str, Any]


def _finite(stats: Row | None) -> bool:
    return stats is None or stats["finite"] == 1.0


def first_nonfinite_forward(rows: list[Row]) -> Row | None:
    """The first module call, in execution order, whose output is non-finite while its input
    was finite (or not recorded); failing that, the first with a non-finite output; None when
    every output is finite.

    Args:
        rows: ``ActivationRecorder(..., inputs=True).to_host()``.
    """
    bad = [r for r in rows if r["out"]["finite"] == 0.0]
    if not bad:
        return None
    return next((r for r in bad if _finite(r["in"])), bad[0])


def first_nonfinite_backward(rows: list[Row]) -> Row | None:
    """Where backward first produced a non-finite gradient.

    Args:
        rows: ``GradientRecorder(...).to_host()`` (module output gradients, and with
            ``inputs=True`` module input gradients, and parameter gradients), in arrival order.

    Returns:
        None when every gradient is finite; else ``{"name", "kind", "stats",
        "last_finite_module", "culprit", "nonfinite"}``: the first non-finite record, the
        last module whose output gradient was still finite before it, and ``culprit``, the
        module whose backward turned a finite gradient into a non-finite one: the innermost
        module with a finite output gradient and a non-finite input gradient, else (no input
        gradients recorded) the last finite module.
    """
    bad = [r for r in rows if r["stats"]["finite"] == 0.0]
    if not bad:
        return None
    first = bad[0]
    before = [r for r in rows if r["order"] < first["order"] and r["kind"] == "module"]
    last_ok = before[-1]["name"] if before else None
    out_finite = {r["name"]: r["stats"]["finite"] == 1.0 for r in rows if r["kind"] == "module"}
    # Input-gradient hooks fire in the order the modules finished their forward, so the
    # first such record is the innermost module (a gate inside a block sharing its input).
    culprit = next(
        (r["name"] for r in bad if r["kind"] == "module_input" and out_finite.get(r["name"], True)),
        None,
    )
    return {
        "name": first["name"],
        "kind": first["kind"],
        "stats": first["stats"],
        "last_finite_module": last_ok,
        "culprit": culprit or last_ok,
        "nonfinite": [r["name"] for r in bad],
    }


def first_nonfinite_op(trace: dict[str, list[Row]], direction: str) -> Row | None:
    """The first op whose result went non-finite from finite inputs.

    Args:
        trace: ``OpTracer.to_host()``.
        direction: "forward" (the op's output, from finite inputs) or "backward" (the node's
            produced gradient, from a finite incoming gradient).

    Returns:
        The op's row (forward: ``{"index", "op", "module", "in", "out"}``; backward: ``{…,
        "node", "grad_in", "grad_out"}``), or None.
    """
    if direction == "forward":
        for r in trace["forward"]:
            if r["out"]["finite"] == 0.0 and _finite(r["in"]):
                return r
        return None
    if direction != "backward":
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    for r in trace["backward"]:
        if r["grad_out"]["finite"] == 0.0 and r["grad_in"]["finite"] == 1.0:
            return r
    return None
