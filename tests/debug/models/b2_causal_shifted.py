"""Fault: a GPT whose causal mask is shifted by one (position t also sees t + 1)."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(causal="shifted")
