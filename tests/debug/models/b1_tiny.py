"""A tiny GPT used by team B1's debugger tests, with switches that plant faults.

Contract-1 compatible (``build_model``, ``get_batch``); the fault files next to it import it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEQ = 16


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, *, norm: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d) if norm else nn.Identity()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(
        self,
        vocab: int = VOCAB,
        d: int = 32,
        n_layers: int = 2,
        n_heads: int = 2,
        seq: int = SEQ,
        *,
        init_std: float | None = 0.02,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.max_seq_len = seq
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, norm=norm) for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(d) if norm else nn.Identity()
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if init_std is not None:
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = (
                        init_std / math.sqrt(2 * n_layers)
                        if name.endswith(("proj.weight", "out.weight"))
                        else init_std
                    )
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(L, device=input_ids.device))
        mask = None
        if attention_mask is not None:  # causal AND key is a real token; (B, 1, L, L)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(L, dtype=torch.bool, device=x.device)  # never an empty row
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm_f(x))  # (B, L, V)


def build_model() -> TinyGPT:
    return TinyGPT()


def get_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)
