"""Fault: the first layer is initialised ~300x smaller than the others and normalised right
after (scale-invariant): its gradient is ~300x larger than the last layer's."""

from __future__ import annotations

from b2_mlp_stack import Stack, get_batch  # noqa: F401


def build_model() -> Stack:
    d = 32
    return Stack(act="gelu", post_norm=True, stds=[3e-3 * d**-0.5] + [d**-0.5] * 3)
