"""Fault: BatchNorm1d over every token of the batch instead of LayerNorm (samples mix in training)."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(norm="batch")
