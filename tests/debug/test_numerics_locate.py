"""The numerics checks name the op and the culprit module with the locator the Monitor's
replay uses (tdiag.hooks.locate): one way of finding the first non-finite module."""

from __future__ import annotations

import torch
from b1_tiny import TinyGPT
from torch import nn

from tdiag.debug.numerics import nonfinite_backward, nonfinite_forward


class LogAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class SqrtZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(x * 0)


def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().eval()


def test_forward_finding_names_the_op(make_ctx) -> None:
    m = model()
    assert nonfinite_forward(make_ctx(m)) == []
    m.blocks[1].act = LogAct()
    (f,) = nonfinite_forward(make_ctx(m))
    assert f.where == "blocks.1.act" and f.evidence["op"] == "log"
    assert f.evidence["op_input"]["finite"] == 1.0


def test_backward_finding_names_the_op_and_the_culprit(make_ctx) -> None:
    m = model()
    assert nonfinite_backward(make_ctx(m)) == []
    m.blocks[1].fc = nn.Sequential(m.blocks[1].fc, SqrtZero())
    (f,) = nonfinite_backward(make_ctx(m))
    assert f.evidence["op"].startswith("sqrt")
    assert f.evidence["culprit"] == "blocks.1.fc.1"  # SqrtZero's own backward made the NaN
    assert f.evidence["op_input"]["zero_frac"] == 1.0  # sqrt(x * 0): every input is 0
