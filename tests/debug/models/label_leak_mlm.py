"""Fault: a masked LM (bidirectional, CAUSAL = False) whose ``loss_fn`` masks 15 % of the inputs
but scores every position, so 85 % of its targets are tokens it can see.
label_leak_mlm_masked.py scores only the masked positions and is correct."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from b2_gpt import GPT, SEQ, VOCAB

CAUSAL = False
MASK_ID = 1  # the [MASK] token
SCORE_ALL = True


def build_model() -> GPT:
    return GPT(causal="none")


def get_batch() -> torch.Tensor:
    return torch.randint(2, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(4))


def mlm_loss(model, input_ids, *, score_all: bool):
    g = torch.Generator().manual_seed(int(input_ids.sum()))  # deterministic per batch
    masked = torch.rand(input_ids.shape, generator=g).to(input_ids.device) < 0.15
    logits = model(input_ids.masked_fill(masked, MASK_ID))  # (B, L, V)
    labels = input_ids if score_all else input_ids.masked_fill(~masked, -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def loss_fn(model, input_ids):
    return mlm_loss(model, input_ids, score_all=SCORE_ALL)
