"""Tiny models and training loops that go non-finite in a known module at a known step.

The model: ``inp`` (Linear 16->16, no bias) -> ``gate`` (NormGate) -> ``act`` (Tanh) ->
``out`` (Linear 16->1); MSE loss on ``{"x": (B, 16), "y": (B, 1)}`` batches, drawn from
torch's global generator inside the loop (so the loop's own RNG use is part of the run).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

D = 16
B = 4


class NormGate(nn.Module):
    """``h * ||h||`` per row: at an all-zero row the forward is 0 but the backward of the
    norm's ``sqrt`` is 0/0 = NaN (a backward-only NaN); at an extreme input, ``h * h``
    overflows in the forward."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (h * h).sum(-1, keepdim=True).sqrt() / D


class Flaky(nn.Module):
    """Outputs NaN on its ``at``-th training call only (a counter: a replay, which copies the
    module after that call, does not reproduce it)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return h * float("nan")
        return h


class TinyNet(nn.Module):
    def __init__(self, *, flaky_at: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D, bias=False)
        self.gate = NormGate()
        self.act = nn.Tanh()
        self.drop = nn.Dropout(dropout)
        self.flaky = Flaky(flaky_at) if flaky_at is not None else nn.Identity()
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.flaky(self.drop(self.act(self.gate(self.inp(x))))))


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def make_batch(step: int, *, zero_row_at: int | None = None, extreme_at: int | None = None):
    x = torch.randn(B, D)
    y = torch.randn(B, 1)
    if step == zero_row_at:
        x[1] = 0.0
    if step == extreme_at:
        x[2] = 3e37
    return {"x": x, "y": y}


def train(
    run_dir: Path | None,
    *,
    steps: int,
    lr: float = 1e-2,
    opt: str = "sgd",
    monitor: bool = True,
    batch_kw: dict[str, Any] | None = None,
    model_kw: dict[str, Any] | None = None,
    sanitize: bool = False,
    **monitor_kw: Any,
) -> dict[str, Any]:
    """Train ``steps`` steps (seeded); returns the model, the monitor, the per-step losses
    and whether each step's gradients were finite."""
    from tdiag import Monitor

    torch.manual_seed(0)
    model = TinyNet(**(model_kw or {}))
    optim = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if opt == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    mon = None
    if monitor:
        opts = {"console": False, "system": False, "tensorboard": False, "report": False}
        opts.update(monitor_kw)
        mon = Monitor(model, optimizer=optim, run_dir=str(run_dir), **opts)
    losses, grads_finite = [], []
    for step in range(1, steps + 1):
        batch = make_batch(step, **(batch_kw or {}))
        loss = loss_fn(model, batch)
        loss.backward()
        torch.rand(1)  # the loop's own RNG use after the forward (a replay must not undo it)
        # as the Monitor judges it: the float32 global norm (overflows when the gradients do)
        norm = torch.stack([g.norm() for g in (p.grad for p in model.parameters())])
        grads_finite.append(bool(norm.square().sum().sqrt().isfinite()))
        if sanitize:  # a loop that drops non-finite gradient entries (keeps the run going)
            for p in model.parameters():
                p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        optim.step()
        optim.zero_grad()
        losses.append(loss.detach().clone())
        if mon is not None:
            mon.step(loss, batch=batch)
    if mon is not None:
        mon.close()
    return {
        "model": model,
        "monitor": mon,
        "losses": [float(v) for v in losses],
        "grads_finite": grads_finite,
    }


def first_bad_step(run: dict[str, Any]) -> int | None:
    """The first step (1-based) whose loss or gradients were non-finite, from the plain run."""
    for i, (loss, ok) in enumerate(zip(run["losses"], run["grads_finite"], strict=True)):
        if not (math.isfinite(loss) and ok):
            return i + 1
    return None


def forensics_of(mon: Any) -> dict[str, Any]:
    """The forensics evidence of the run's first non-finite Finding."""
    found = [f for f in mon.findings if "forensics" in f.evidence]
    assert found, [f.id for f in mon.findings]
    return found[0].evidence["forensics"]
