"""Fault: a right-padded dict batch whose labels are a copy of input_ids, pad ids included (not
-100), for a causal LM whose own loss ignores only -100: every pad after a pad is a target.
pad_loss_labels_masked.py (-100 at pads) and pad_loss_ignore_pad.py (the loss's ignore_index is
the pad id) are correct."""

from __future__ import annotations

import torch
from b2_gpt import PAD, SEQ, VOCAB
from label_leak_own_loss import LM

LENGTHS = (16, 9, 12, 6)  # real tokens per row: 19 of the 64 positions are padding


def build_model() -> LM:
    return LM(shift=True)


def padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def get_batch() -> dict[str, torch.Tensor]:
    ids, mask = padded()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}  # the bug
