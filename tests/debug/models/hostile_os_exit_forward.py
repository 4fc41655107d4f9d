"""The tiny GPT whose forward ends the process with ``os._exit(0)`` on its second call: the
validating forward at load time passes, the first check that runs the model ends the process.
``tdiag check`` must keep the finished checks and report the one that was running (exit 2)."""

from __future__ import annotations

import os

import torch
from b1_tiny import TinyGPT, get_batch

__all__ = ["build_model", "get_batch"]


class ExitingGPT(TinyGPT):
    calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        type(self).calls += 1
        if type(self).calls > 1:
            os._exit(0)
        return super().forward(input_ids, attention_mask)


def build_model() -> ExitingGPT:
    return ExitingGPT()
