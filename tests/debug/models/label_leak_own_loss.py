"""Fault: a causal LM whose own loss scores the logits at t against labels[t], without the shift,
fed ``labels = input_ids`` as a Hugging Face Trainer feeds a GPT-2: it is trained to repeat the
token it is given. ``LM(shift=True)`` is the correct model (label_leak_own_loss_shifted.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from b2_gpt import GPT, PAD, SEQ, VOCAB


@dataclass
class Output:
    logits: torch.Tensor  # (B, L, V)
    loss: torch.Tensor | None = None


class LM(GPT):
    def __init__(self, *, shift: bool = False, ignore_index: int = -100, **kw) -> None:
        super().__init__(**kw)
        self.shift, self.ignore_index = shift, ignore_index

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm_head(self.hidden(input_ids, attention_mask))  # (B, L, V)
        loss = None
        if labels is not None:
            scored, targets = (logits[:, :-1], labels[:, 1:]) if self.shift else (logits, labels)
            loss = F.cross_entropy(
                scored.reshape(-1, scored.shape[-1]),
                targets.reshape(-1),
                ignore_index=self.ignore_index,
            )
        return Output(logits, loss)


def build_model() -> LM:
    return LM()


def get_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    ids[2, -5:], mask[2, -5:] = PAD, 0  # one right-padded sample
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
