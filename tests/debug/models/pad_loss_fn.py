"""Fault: a padded dict batch without labels and a loss_fn that takes its next-token targets
from input_ids without masking the pads. pad_loss_fn_masked.py masks them and is correct."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from b2_gpt import GPT
from pad_loss_labels import padded

MASK_PADS = False


def build_model() -> GPT:
    return GPT()


def get_batch() -> dict[str, torch.Tensor]:
    ids, mask = padded()
    return {"input_ids": ids, "attention_mask": mask}


def lm_loss(model, batch, *, mask_pads: bool):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(ids, attention_mask=mask)  # (B, L, V)
    targets = ids[:, 1:]
    if mask_pads:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


def loss_fn(model, batch):
    return lm_loss(model, batch, mask_pads=MASK_PADS)
