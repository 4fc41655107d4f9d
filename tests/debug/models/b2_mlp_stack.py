"""A deep per-token stack (embedding -> blocks -> head) without residual connections, for the
gradient-flow tests. ``build_model`` here is the healthy variant (residuals + Pre-LN)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64
SEQ = 16


class Layer(nn.Module):
    def __init__(self, d: int, *, act: str, std: float, post_norm: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        nn.init.normal_(self.lin.weight, 0.0, std)
        nn.init.zeros_(self.lin.bias)
        self.act = {"none": nn.Identity(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU()}[act]
        self.norm = nn.LayerNorm(d) if post_norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.act(self.lin(x)))


class Stack(nn.Module):
    def __init__(
        self,
        *,
        d: int = 32,
        n_layers: int = 6,
        act: str = "gelu",
        stds=None,
        residual: bool = False,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        stds = stds or [d**-0.5] * n_layers
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ, d)
        self.layers = nn.ModuleList(Layer(d, act=act, std=s, post_norm=post_norm) for s in stds)
        self.residual = residual
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        for layer in self.layers:
            x = x + layer(x) if self.residual else layer(x)
        return self.head(x)


def build_model() -> Stack:
    return Stack(residual=True, post_norm=True)


def get_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4, SEQ), generator=g)
