"""Fault: a deep sigmoid stack without residual connections: the gradient shrinks by ~4x per
layer on its way back to the first layers."""

from __future__ import annotations

from b2_mlp_stack import Stack, get_batch  # noqa: F401


def build_model() -> Stack:
    return Stack(act="sigmoid", n_layers=8)
