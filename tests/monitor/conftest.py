"""Fixtures of the Monitor tests: a tiny GPT-ish model and a real training loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 61


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyGPT(nn.Module):
    """A 2-layer decoder: embed -> blocks -> norm_f -> lm_head, logits (B, L, V)."""

    def __init__(
        self, vocab: int = VOCAB, d: int = 32, layers: int = 2, heads: int = 2, max_len: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(TinyBlock(d, heads) for _ in range(layers))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture
def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def make_batch(step: int, batch: int = 4, seq: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def train_loop(
    model: nn.Module,
    mon: Any,
    steps: int,
    *,
    opt: torch.optim.Optimizer | None = None,
    clip: float | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    pass_grad_norm: bool = True,
) -> torch.optim.Optimizer:
    """A plain user loop: forward, backward, (clip), step, zero_grad, mon.step."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        ids = make_batch(step)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        norm = None
        if clip is not None:
            norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss, tokens=ids.numel(), grad_norm=norm if pass_grad_norm else None)
        if on_step is not None:
            on_step(step, model)
    return opt


class ListSink:
    """A stub sink that keeps what it was given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.events: list[Any] = []
        self.opened = self.closed = False

    def open(self, run_dir, meta) -> None:
        self.opened = True
        self.meta = meta

    def write(self, step: int, metrics) -> None:
        self.rows.append((step, dict(metrics)))

    def event(self, finding) -> None:
        self.events.append(finding)

    def close(self) -> None:
        self.closed = True

    def merged(self) -> dict[int, dict[str, float]]:
        """Rows merged per step (a step may get a metrics row and a ``log()`` row)."""
        out: dict[int, dict[str, float]] = {}
        for step, m in self.rows:
            out.setdefault(step, {}).update(m)
        return out

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, m[key]) for s, m in self.rows if key in m]


def quiet_options(tmp_path, **kw: Any) -> dict[str, Any]:
    """Monitor options for tests: no console, no TensorBoard, no sampler thread, no signals."""
    opts = dict(
        run_dir=tmp_path / "run",
        console=False,
        tensorboard=False,
        system=False,
        handle_signals=False,
        report=False,
    )
    opts.update(kw)
    return opts


def isclose(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)
