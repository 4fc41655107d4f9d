"""Fault: ReLU feed-forward whose first layer has a bias of -10: every unit is dead at init."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT(act="relu", fc_bias=-10.0)
