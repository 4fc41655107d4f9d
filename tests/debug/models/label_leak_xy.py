"""Fault: nanoGPT fed an ``(x, y)`` batch whose ``y`` is ``x`` itself (the ``+ 1`` of
``data[i + 1 : i + 1 + block_size]`` forgotten): the model's loss compares each position with
the token it is given. label_leak_xy_shifted.py is the correct loader."""

from __future__ import annotations

import torch
from b2_nanogpt import GPT, GPTConfig

BLOCK = 16
SHIFT = 0  # the bug; the correct loader uses 1
DATA = torch.randint(0, 128, (2000,), generator=torch.Generator().manual_seed(0))


def build_model() -> GPT:
    return GPT(GPTConfig(block_size=BLOCK))


def load(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(DATA) - BLOCK - 1, (4,), generator=torch.Generator().manual_seed(1))
    x = torch.stack([DATA[i : i + BLOCK] for i in ix])
    y = torch.stack([DATA[i + shift : i + shift + BLOCK] for i in ix])
    return x, y


def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's signature
    return load(SHIFT)


def example_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return get_batch("train")
