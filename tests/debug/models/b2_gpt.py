"""A tiny GPT for team B2's debugger tests, written plainly, with switches that plant faults.

This file itself is a clean, Contract-1 model file: a causal LM with a dict batch
(``input_ids``, ``attention_mask``) and a correct ``decode_with_cache``. The ``b2_*`` files next
to it import :class:`GPT` and flip one switch each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEQ = 16
PAD = 0


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, *, causal: str, scale: bool, use_mask: bool) -> None:
        super().__init__()
        self.h, self.causal, self.scale, self.use_mask = n_heads, causal, scale, use_mask
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, attention_mask=None, cache=None):  # x (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (
            t.view(B, L, self.h, D // self.h).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, L, Dh)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        S = k.shape[2]
        scores = q @ k.transpose(-2, -1)  # (B, H, L, S)
        if self.scale:
            scores = scores / math.sqrt(D // self.h)
        if self.causal != "none":
            # query i sits at absolute position S - L + i; "shifted" also lets it see i + 1
            diag = S - L + (1 if self.causal == "shifted" else 0)
            allowed = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(diagonal=diag)
            scores = scores.masked_fill(~allowed, float("-inf"))
        if attention_mask is not None and self.use_mask:
            scores = scores.masked_fill(attention_mask[:, None, None, :S] == 0, -1e9)
        y = scores.softmax(dim=-1) @ v  # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, d: int, *, act: str) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.act = act

    def forward(self, x):
        h = self.fc(x)
        h = F.relu(h) if self.act == "relu" else F.gelu(h)
        return self.out(h)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, *, norm: str, **attn) -> None:
        super().__init__()
        self.norm = norm
        self.ln1 = nn.BatchNorm1d(d) if norm == "batch" else nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, **attn)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = None

    def _norm1(self, x):
        if self.norm == "batch":  # statistics over every token of every sample
            B, L, D = x.shape
            return self.ln1(x.reshape(B * L, D)).view(B, L, D)
        return self.ln1(x)

    def forward(self, x, attention_mask=None, cache=None):
        x = x + self.attn(self._norm1(x), attention_mask, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Switches: causal "ok" | "none" | "shifted"; norm "layer" | "batch"; use_mask; pos;
    scale (1/sqrt(d_k)); init_std; act "gelu" | "relu"; fc_bias (init of the MLP's first bias)."""

    def __init__(
        self,
        *,
        vocab: int = VOCAB,
        d: int = 32,
        n_layers: int = 2,
        n_heads: int = 2,
        seq: int = SEQ,
        causal: str = "ok",
        norm: str = "layer",
        use_mask: bool = True,
        pos: bool = True,
        scale: bool = True,
        init_std: float = 0.02,
        act: str = "gelu",
        fc_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d) if pos else None
        attn = {"causal": causal, "scale": scale, "use_mask": use_mask}
        self.blocks = nn.ModuleList(Block(d, n_heads, norm=norm, **attn) for _ in range(n_layers))
        for b in self.blocks:
            b.mlp = MLP(d, act=act)
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, init_std)
            elif name.endswith("mlp.fc.bias"):
                nn.init.constant_(p, fc_bias)
            elif name.endswith("bias") and "ln" not in name and "norm" not in name:
                nn.init.zeros_(p)

    def hidden(self, input_ids, attention_mask=None, cache=None, offset=0):
        _B, L = input_ids.shape
        x = self.embed(input_ids)  # (B, L, D)
        if self.pos is not None:
            x = x + self.pos(torch.arange(offset, offset + L, device=input_ids.device))
        for i, block in enumerate(self.blocks):
            x = block(x, attention_mask, None if cache is None else cache.setdefault(i, {}))
        return self.norm_f(x)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.hidden(input_ids, attention_mask))  # (B, L, V)


def build_model() -> GPT:
    return GPT()


def get_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    ids[1, -4:], mask[1, -4:] = PAD, 0  # one right-padded sample
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def decode_with_cache(
    model: GPT, input_ids: torch.Tensor, *, offset_positions: bool = True
) -> torch.Tensor:
    """Logits (B, L, V), one token at a time through a KV cache."""
    cache: dict = {}
    steps = []
    for t in range(input_ids.shape[1]):
        h = model.hidden(input_ids[:, t : t + 1], cache=cache, offset=t if offset_positions else 0)
        steps.append(model.lm_head(h))
    return torch.cat(steps, dim=1)
