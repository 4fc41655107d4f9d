"""Shared by the loop tests: a tiny GPT, quiet Monitor options, the history as rows, and a
comparison that prints every step's numbers when it fails.

No pytest in here: ``ddp_loop.py`` (run by torchrun, not by pytest) imports it too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


class Block(nn.Module):
    """Pre-LN block: causal SDPA attention and a GELU MLP, nanoGPT's layout."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """token + position embedding -> blocks -> ln_f -> lm_head; logits (B, L, V)."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(64, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch(seed: int, size: int = 2, seq: int = 16) -> torch.Tensor:
    """A deterministic batch of token ids (size, seq)."""
    return torch.randint(0, VOCAB, (size, seq), generator=torch.Generator().manual_seed(seed))


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """The reference gradient norm: ``sqrt(Σ‖∇p‖²)`` in float64 over the parameters that
    have a gradient (the Monitor's norm is compared with this)."""
    sq = math.fsum(float(p.grad.double().square().sum()) for p in params if p.grad is not None)
    return math.sqrt(sq)


def quiet_options(run_dir: Path | str, **kw: Any) -> dict[str, Any]:
    """Monitor options for tests: no console, TensorBoard, sampler thread, signals or report."""
    opts: dict[str, Any] = dict(
        run_dir=Path(run_dir),
        console=False,
        tensorboard=False,
        system=False,
        handle_signals=False,
        report=False,
    )
    opts.update(kw)
    return opts


def history_rows(run_dir: Path | str) -> dict[int, dict[str, float]]:
    """history.jsonl as ``{step: {metric: value}}`` (rows of one step merged, NaN cells of
    the sparse history dropped), read with tdiag's own reader."""
    from tdiag.history import read_history

    df, _ = read_history(run_dir)
    rows: dict[int, dict[str, float]] = {}
    for record in df.to_dict("records"):
        step = int(record.pop("step"))
        kept = {k: float(v) for k, v in record.items() if isinstance(v, float) and v == v}
        rows.setdefault(step, {}).update(kept)
    return rows


def series(rows: Mapping[int, Mapping[str, float]], key: str) -> dict[int, float]:
    """``{step: value}`` of one metric, for the rows that have it."""
    return {s: row[key] for s, row in rows.items() if key in row}


def mismatch(
    name: str,
    got: Mapping[int, float],
    want: Mapping[int, float],
    *,
    rel: float = 0.0,
    steps: Iterable[int] | None = None,
) -> str | None:
    """None when ``got[s] == want[s]`` within ``rel`` (relative) at every one of ``steps``
    (default: every step of ``want``); otherwise a table of every step with both numbers."""
    steps = sorted(want) if steps is None else list(steps)
    lines, bad = [], 0
    for s in steps:
        g, w = got.get(s), want[s]
        ok = g is not None and (g == w or math.isclose(g, w, rel_tol=rel, abs_tol=0.0))
        if g is None:
            diff = "missing"
        else:
            diff = f"rel {abs(g - w) / abs(w):.2e}" if w else f"abs {g - w:+.3g}"
        bad += not ok
        mark = "" if ok else "  <-"
        lines.append(f"  step {s:>3}: tdiag {g!r:<22} reference {w!r:<22} {diff}{mark}")
    if not bad:
        return None
    return "\n".join([f"{name}: {bad} of {len(steps)} step(s) differ (rel tol {rel:g})", *lines])


def unless(condition: bool, message: str) -> str | None:
    """``message`` when ``condition`` does not hold: a check for :func:`assert_no_mismatch`."""
    return None if condition else message


def assert_no_mismatch(*problems: str | None) -> None:
    """Fail with every comparison that did not hold (not only the first)."""
    found = [p for p in problems if p]
    assert not found, "\n".join(found)


@contextlib.contextmanager
def tdiag_warnings() -> Iterator[list[str]]:
    """Collect what tdiag warns about, whether through ``logging`` (``tdiag.*`` loggers, level
    WARNING and up) or ``warnings.warn``; the list fills as the block runs."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    log = logging.getLogger("tdiag")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(
            str(w.message)
            for w in caught
            if "tdiag" in str(w.message).lower() or "/tdiag/" in (w.filename or "")
        )
    finally:
        log.removeHandler(handler)
