"""The tiny GPT with a log() in the second block's MLP: NaN appears in blocks.1.act."""

from __future__ import annotations

import torch
from b1_tiny import TinyGPT, get_batch  # noqa: F401  (get_batch is part of the contract)
from torch import nn


class LogAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for x < 0


def build_model() -> TinyGPT:
    m = TinyGPT()
    m.blocks[1].act = LogAct()
    return m
