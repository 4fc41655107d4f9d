"""The tiny GPT fed a dict batch with right padding, a mask and labels (-100 on pads)."""

from __future__ import annotations

import torch
from b1_tiny import VOCAB, TinyGPT

PAD = 0


def build_model() -> TinyGPT:
    return TinyGPT()


def get_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[3, 10:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask}
