"""One optimizer step's forward and backward (gradient accumulation, mixed precision, label
smoothing, DDP's deferred all-reduce) and the validation loss."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .batching import count_labels, mask_for_mlm
from .config import TrainConfig
from .model import IGNORE_INDEX, lm_loss


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_backward(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Tensor]],
    *,
    causal: bool = True,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    distributed: bool = False,
    n_labels: int | None = None,
) -> Tensor:
    """Accumulate the gradients of one optimizer step over its micro-batches.

    Each micro-batch's summed loss is divided by the step's total label count, so k
    micro-batches give the gradient of one batch of their union exactly, even when padding
    makes them unequal. Under DDP, gradients are all-reduced only on the last micro-batch.

    Returns:
        0-d tensor: the step's mean loss (detached, on the device; no host sync).
    """
    if n_labels is None:
        n_labels = sum(count_labels(b, causal=causal) for b in micro_batches)
    device = micro_batches[0]["input_ids"].device
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if (distributed and not last) else contextlib.nullcontext()
        with sync:
            with autocast_context(device, precision):
                logits = model(batch["input_ids"], batch.get("attention_mask")).logits
            loss_sum = lm_loss(
                logits,
                batch["labels"],
                causal=causal,
                label_smoothing=label_smoothing,
                reduction="sum",
            )
            loss = loss_sum / max(n_labels, 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.detach()
    return step_loss


def step_loss(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Tensor]],
    *,
    causal: bool = True,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss :func:`forward_backward` back-propagates for one step, without the backward:
    the ``loss_fn(model, batch)`` the Monitor's forensics replay a step with."""
    n_labels = sum(count_labels(b, causal=causal) for b in micro_batches)
    device = micro_batches[0]["input_ids"].device
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        with autocast_context(device, precision):
            logits = model(batch["input_ids"], batch.get("attention_mask")).logits
        total = total + lm_loss(
            logits, batch["labels"], causal=causal, label_smoothing=label_smoothing, reduction="sum"
        )
    return total / max(n_labels, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[dict[str, Tensor]], cfg: TrainConfig, device: torch.device
) -> float:
    """Mean token cross-entropy on the given batches (one host sync at the end)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    g = torch.Generator().manual_seed(12345)
    causal = model.config.causal
    for batch in batches:
        if not causal:
            batch = mask_for_mlm(batch, cfg.mlm_prob, g)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, cfg.precision):
            logits = model(batch["input_ids"], batch.get("attention_mask")).logits
        total += lm_loss(logits, batch["labels"], causal=causal, reduction="sum")
        labels = batch["labels"][:, 1:] if causal else batch["labels"]
        count += (labels != IGNORE_INDEX).sum()
    model.train(was_training)
    return (total / count.clamp_min(1)).item()  # host sync (once per evaluation)
