"""Fault: attention scores not scaled by 1/sqrt(d_k), with weights initialised at std 1."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(scale=False, init_std=1.0)
