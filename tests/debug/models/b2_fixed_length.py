"""A clean model file with only a factory (no batch, no loss): a small post-LN decoder on
nn.TransformerEncoder that only accepts sequences of exactly its block size (a (1, L, D) positional
parameter added whole), as some users write it."""

from __future__ import annotations

import torch
from torch import nn


class FixedLengthLM(nn.Module):
    def __init__(self, vocab_size: int = 96, max_seq_len: int = 24, d: int = 32) -> None:
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(1, max_seq_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab_size)
        mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).triu(
            diagonal=1
        )  # True = hidden
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos  # only works for L == max_seq_len
        return self.head(self.body(x, mask=self.causal_mask))


def build_model() -> FixedLengthLM:
    return FixedLengthLM()
