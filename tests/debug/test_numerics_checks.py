"""Numerics checks: a model with the fault and one without, and the `where` they name."""

from __future__ import annotations

import pytest
import torch
from b1_tiny import TinyGPT
from torch import nn

from tdiag.debug.numerics import (
    FP16_MAX,
    fp16_overflow_risk,
    nonfinite_backward,
    nonfinite_forward,
    nonfinite_param,
)
from tdiag.debug.registry import SkipCheck
from tdiag.findings import Severity


class LogAct(nn.Module):
    """log of a GELU input: NaN for negative inputs (finite in, NaN out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class SqrtZero(nn.Module):
    """Finite forward (adds sqrt(0) = 0), NaN backward (d sqrt/du at 0 = inf, times 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(x * 0)


class Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().eval()


def test_nonfinite_param(make_ctx) -> None:
    m = model()
    assert nonfinite_param(make_ctx(m)) == []
    with torch.no_grad():
        m.blocks[1].proj.bias[3] = float("inf")
    (f,) = nonfinite_param(make_ctx(m))
    assert f.severity is Severity.ERROR and f.where == "blocks.1.proj.bias"


def test_nonfinite_param_sees_buffers(make_ctx) -> None:
    m = model()
    m.register_buffer("scale", torch.tensor([1.0, float("nan")]))
    (f,) = nonfinite_param(make_ctx(m))
    assert f.where == "scale"


def test_nonfinite_param_accepts_float_mask_buffer_with_minus_inf(make_ctx) -> None:
    m = model()
    # the nn.Transformer.generate_square_subsequent_mask pattern: -inf on purpose
    m.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(8))
    assert nonfinite_param(make_ctx(m)) == []


def test_nonfinite_forward_names_first_module_with_finite_input(make_ctx) -> None:
    m = model()
    assert nonfinite_forward(make_ctx(m)) == []
    m.blocks[1].act = LogAct()
    (f,) = nonfinite_forward(make_ctx(m))
    # blocks.1.act is where NaN appears; blocks.1.out, blocks.1, norm_f, lm_head inherit it
    assert f.where == "blocks.1.act"
    assert f.evidence["input"]["finite"] == 1.0 and f.evidence["output"]["finite"] == 0.0
    assert "blocks.1.out" in f.evidence["nonfinite_modules"]
    assert f.evidence["logits_finite"] is False


def test_nonfinite_forward_blames_nan_weights_layer(make_ctx) -> None:
    m = model()
    with torch.no_grad():
        m.blocks[0].fc.weight[0, 0] = float("nan")
    (f,) = nonfinite_forward(make_ctx(m))
    assert f.where == "blocks.0.fc"


def test_nonfinite_backward(make_ctx) -> None:
    m = model()
    assert nonfinite_backward(make_ctx(m)) == []
    m.blocks[1].fc = nn.Sequential(m.blocks[1].fc, SqrtZero())
    ctx = make_ctx(m)
    assert nonfinite_forward(ctx) == []  # the forward is clean
    (f,) = nonfinite_backward(ctx)
    # SqrtZero's input is blocks.1.fc.0's output: the first to receive the NaN gradient
    assert f.where == "blocks.1.fc.0"
    assert f.evidence["last_finite_module"] in ("blocks.1.fc.1", "blocks.1.fc")  # same tensor
    assert all(p.grad is None for p in m.parameters())  # .grad untouched


def test_nonfinite_backward_skips_when_forward_is_nan(make_ctx) -> None:
    m = model()
    m.blocks[0].act = LogAct()
    with pytest.raises(SkipCheck):
        nonfinite_backward(make_ctx(m))


def test_fp16_overflow_risk(make_ctx) -> None:
    m = model()
    assert fp16_overflow_risk(make_ctx(m)) == []
    m.blocks[0].act = nn.Sequential(nn.GELU(), Scale(1e6))
    (f,) = fp16_overflow_risk(make_ctx(m))
    assert f.where == "blocks.0.act.1"
    assert f.evidence["modules"]["blocks.0.act.1"] > FP16_MAX


def test_nonfinite_backward_skips_when_loss_has_no_graph(make_ctx) -> None:
    class Detached(TinyGPT):
        def forward(self, input_ids):
            return super().forward(input_ids).detach()

    torch.manual_seed(0)
    with pytest.raises(SkipCheck, match="no trainable parameter"):
        nonfinite_backward(make_ctx(Detached()))
