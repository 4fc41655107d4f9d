"""Fault: a bidirectional encoder without any positional information (a bag of tokens)."""

from __future__ import annotations

from b2_encoder import Encoder, get_batch  # noqa: F401

CAUSAL = False


def build_model() -> Encoder:
    return Encoder(pos=False)
