"""Fault: decode_with_cache forgets the position offset (every new token is at position 0)."""

from __future__ import annotations

import b2_gpt
from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    return GPT()


def decode_with_cache(model, input_ids):
    return b2_gpt.decode_with_cache(model, input_ids, offset_positions=False)
