"""Fault: make_optimizer returns an optimizer with a learning rate of 0 (the loss cannot decrease)."""

from __future__ import annotations

import torch
from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT()


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=0.0)
