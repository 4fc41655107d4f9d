"""Optimisation of the reference trainer: AdamW with weight-decay groups, the learning-rate
schedules, the optimizer step (clipping, fp16 loss scaling) and early stopping."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices of linear layers: not norms, biases, or embeddings (tied head included)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.LayerNorm | nn.RMSNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith("pos.weight"):
            no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (the fused kernel on CUDA)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of cfg.lr at a step (LambdaLR). Peak 1.0 at the end of warmup.

    noam: min(s / w, sqrt(w / s)) — Vaswani et al. 2017's d^-0.5 min(s^-0.5, s w^-1.5), with
    the peak value d^-0.5 w^-0.5 taken by cfg.lr.
    """
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def fn(step: int) -> float:
        s = step + 1
        if cfg.schedule == "noam":
            w = max(warmup, 1)
            return min(s / w, math.sqrt(w / s))
        if warmup and s <= warmup:
            return s / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    grad_clip: float,
) -> Tensor | None:
    """Clip, step the optimizer (through fp16's loss scaler), advance the schedule, zero grads.

    Returns:
        the pre-clip global gradient norm (0-d, on the device: no host sync), or None when
        not clipping.
    """
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if scaler.is_enabled():
        with warnings.catch_warnings():
            # fp16: GradScaler skips optimizer.step() on an overflow while the schedule
            # still advances (as in HF Trainer); LambdaLR warns if that is the first step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
            scheduler.step()
    else:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class EarlyStopping:
    """Stop when the validation loss has not improved by min_delta for `patience` evaluations."""

    def __init__(self, *, patience: int, min_delta: float = 0.0) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience!r}")
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0

    def update(self, val_loss: float) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], int(state["bad_evals"])
