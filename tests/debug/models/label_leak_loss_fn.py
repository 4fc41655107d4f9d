"""Fault: a plain tensor batch and a ``loss_fn`` that scores the logits at t against the input
token at t (no shift). label_leak_loss_fn_shifted.py shifts and is correct."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from b1_tiny import VOCAB, TinyGPT


def build_model() -> TinyGPT:
    return TinyGPT()


def get_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


def loss_fn(model, input_ids):
    logits = model(input_ids)  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1), input_ids.flatten())
