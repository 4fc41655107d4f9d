"""Fault: a layer that is built but never called in forward."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401
from torch import nn


class WithUnused(GPT):
    def __init__(self):
        super().__init__()
        self.extra_head = nn.Linear(32, 32)  # never used


def build_model() -> GPT:
    return WithUnused()
