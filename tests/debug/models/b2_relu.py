"""A clean ReLU feed-forward GPT (zero biases): units are alive."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(act="relu")
