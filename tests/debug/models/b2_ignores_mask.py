"""Fault: the attention ignores attention_mask (pad tokens are attended to)."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(use_mask=False)
