"""A clean bidirectional encoder (CAUSAL = False) with learned positions, whose forward takes a
dict batch (input_ids, attention_mask, labels) and returns an object with .logits and .loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from b2_gpt import GPT, PAD, SEQ, VOCAB

CAUSAL = False


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Encoder(GPT):
    def __init__(self, **kw) -> None:
        super().__init__(causal="none", **kw)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm_head(self.hidden(input_ids, attention_mask))
        loss = None
        if labels is not None:  # token-level loss on every real position
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        return Output(logits, loss)


def build_model() -> Encoder:
    return Encoder()


def get_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    ids[2, -5:], mask[2, -5:] = PAD, 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
