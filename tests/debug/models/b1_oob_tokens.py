"""A batch whose ids exceed the vocabulary (a tokenizer with more tokens than the model)."""

from __future__ import annotations

import torch
from b1_tiny import VOCAB, TinyGPT


def build_model() -> TinyGPT:
    return TinyGPT()


def get_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[1, 7] = VOCAB + 3  # e.g. an added special token the embedding was not resized for
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
