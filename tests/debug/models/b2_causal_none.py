"""Fault: a GPT whose attention has no causal mask (position t sees the whole sequence)."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(causal="none")
