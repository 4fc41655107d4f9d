"""Fault: a deep linear stack initialised with std 1 (gain sqrt(d) per layer, no norm, no
residual): the gradient norm at init is astronomically large."""

from __future__ import annotations

from b2_mlp_stack import Stack, get_batch  # noqa: F401


def build_model() -> Stack:
    return Stack(act="none", stds=[1.0] * 6)
