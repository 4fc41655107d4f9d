"""Fault: the positional branch is detached from the graph (its parameters get no gradient)."""

from __future__ import annotations

import torch
from b2_gpt import GPT, get_batch  # noqa: F401


class Detached(GPT):
    def hidden(self, input_ids, attention_mask=None, cache=None, offset=0):
        _B, L = input_ids.shape
        pos = self.pos(torch.arange(L, device=input_ids.device)).detach()  # the bug
        x = self.embed(input_ids) + pos
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.norm_f(x)


def build_model() -> GPT:
    return Detached()
