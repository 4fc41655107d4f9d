"""OpTracer (tdiag.hooks.ops), GradientRecorder's input gradients and the shared locator
(tdiag.hooks.locate): against naive references, on a fault and without one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdiag.hooks import GradientRecorder
from tdiag.hooks.locate import first_nonfinite_backward, first_nonfinite_forward, first_nonfinite_op
from tdiag.hooks.ops import OpTracer


class RootGate(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (h * h).sum(-1, keepdim=True).sqrt()


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4, bias=False), RootGate(), nn.Tanh())


def test_tracer_records_ops_with_modules_and_stats() -> None:
    m = net()
    x = torch.randn(3, 4)
    with OpTracer(m) as tr:
        m(x)
    rows = tr.to_host()["forward"]
    ops = [(r["op"], r["module"]) for r in rows]
    assert ops[0] == ("linear", "0") and ("sqrt", "1") in ops and ops[-1] == ("tanh", "2")
    expected = torch.tanh(m[1](m[0](x))).abs().max().item()
    assert rows[-1]["out"]["abs_max"] == pytest.approx(expected)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_tracer_names_the_backward_op_at_an_exact_zero() -> None:
    m = net()
    x = torch.randn(3, 4)
    with OpTracer(m) as tr:
        m(x).sum().backward()
    assert first_nonfinite_op(tr.to_host(), "backward") is None  # healthy: nothing
    x[1] = 0.0
    m.zero_grad()
    with OpTracer(m) as tr:
        out = m(x)
    out.sum().backward()
    op = first_nonfinite_op(tr.to_host(), "backward")
    assert op["op"] == "sqrt" and op["node"] == "SqrtBackward0" and op["module"] == "1"
    assert op["grad_in"]["finite"] == 1.0 and op["grad_out"]["finite"] == 0.0


def test_tracer_names_the_forward_op_that_overflows() -> None:
    m = net()
    x = torch.randn(3, 4)
    with OpTracer(m) as tr:
        m(x)
    assert first_nonfinite_op(tr.to_host(), "forward") is None
    x[2] = 3e37
    with OpTracer(m) as tr:
        m(x)
    op = first_nonfinite_op(tr.to_host(), "forward")
    assert op["op"] == "mul" and op["module"] == "1" and op["in"]["abs_max"] > 1e36


def test_input_gradients_name_the_module_whose_backward_made_the_nan() -> None:
    m = net()
    x = torch.randn(3, 4)
    x[0] = 0.0
    with GradientRecorder(m, inputs=True) as rec:
        m(x).sum().backward()
    found = first_nonfinite_backward(rec.to_host())
    assert found["culprit"] == "1"  # the gate: finite output gradient, NaN input gradient
    assert found["name"] == "0" and found["last_finite_module"] == "1"
    with GradientRecorder(m, inputs=True) as rec:
        m(torch.randn(3, 4)).sum().backward()
    assert first_nonfinite_backward(rec.to_host()) is None


def _row(name: str, out_ok: bool, in_ok: bool | None) -> dict:
    stats = lambda ok: {"finite": 1.0 if ok else 0.0, "abs_max": 1.0, "rms": 1.0, "zero_frac": 0}  # noqa: E731
    return {
        "name": name,
        "cls_name": "M",
        "out": stats(out_ok),
        "in": None if in_ok is None else stats(in_ok),
    }


def test_first_nonfinite_forward_skips_modules_fed_a_nan() -> None:
    rows = [_row("a", True, True), _row("b.inner", False, False), _row("c", False, True)]
    assert first_nonfinite_forward(rows)["name"] == "c"
    assert first_nonfinite_forward(rows[:1]) is None
    assert first_nonfinite_forward([_row("x", False, False)])["name"] == "x"  # no better one


def test_every_name_of_the_old_hooks_module_is_importable_from_the_package() -> None:
    import tdiag.hooks as hooks

    old = [
        "ATTN_CHUNK_SCORES",
        "ATTN_SAMPLE_ROWS",
        "ATTN_SAMPLE_SCORES",
        "ActivationRecorder",
        "AttentionCall",
        "AttentionCapture",
        "GradRecord",
        "GradientRecorder",
        "ModuleRecord",
        "attention_sample_indices",
        "first_float_tensor",
    ]
    assert set(old) <= set(hooks.__all__)
    assert all(getattr(hooks, name) is not None for name in old)
    assert hooks.ATTN_SAMPLE_ROWS == hooks.attention.ATTN_SAMPLE_ROWS
