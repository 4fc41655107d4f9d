"""A forward that ignores SIGALRM and loops forever: an in-process ``--timeout`` (an alarm
signal) cannot stop it; only a deadline enforced from outside the process can."""

from __future__ import annotations

import signal

import torch
from b1_tiny import TinyGPT, get_batch

__all__ = ["build_model", "get_batch"]


class DeafGPT(TinyGPT):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        n = 0
        while True:  # never returns
            n += 1


def build_model() -> DeafGPT:
    return DeafGPT()
