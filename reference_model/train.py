"""Training loop of the reference Transformer, plain PyTorch, top to bottom.

AdamW with weight-decay groups, warmup + cosine or Noam schedules, gradient clipping, label
smoothing, gradient accumulation, mixed precision (bf16 autocast; fp16 + GradScaler on CUDA),
activation checkpointing, validation, early stopping, atomic checkpoints resumed exactly,
and DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on CUDA).

This file is the loop; the parts live beside it: ``config.py`` (:class:`TrainConfig`),
``batching.py`` (each step's batches), ``step.py`` (forward/backward, evaluation),
``optim.py`` (optimizer, schedules, early stopping), ``checkpointing.py``, ``runtime.py``
(device, DDP), ``callbacks.py`` (progress, tdiag's Monitor) and ``cli.py`` (the command line,
``tdiag demo``). The names they define are importable from here too, as before the split.

``train()`` knows nothing of tdiag: observers plug in as callbacks (plain objects with any of
``on_train_start(state)``, ``on_step_end(state)``, ``on_eval(state)``, ``on_train_end(state)``).
The entry points (``main()``, ``demo_command()``) attach tdiag's Monitor the way a user would.

    python -m reference_model.train --help
    torchrun --nproc_per_node 2 -m reference_model.train --steps 100
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .batching import StepBatches, build_batchers, count_labels, mask_for_mlm
from .callbacks import MonitorCallback, PaddingMeter, ProgressLine, attach_monitor
from .checkpointing import (
    CHECKPOINT_FILE,
    Checkpointer,
    ResumeError,
    RunRecord,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import eval_batches
from .model import Transformer
from .optim import EarlyStopping, build_optimizer, lr_lambda, optimizer_step, param_groups
from .runtime import agree_stop, check_runtime, resolve_device, setup_distributed
from .step import autocast_context, evaluate, forward_backward

# The loop, and the names importable from this module before the split (the command line's
# too: main, build_parser, config_from_args, sample_text, demo_command, demo_config,
# DEMO_STEPS, through __getattr__ below).
__all__ = [
    "CHECKPOINT_FILE",
    "EarlyStopping",
    "MonitorCallback",
    "PaddingMeter",
    "ProgressLine",
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "attach_monitor",
    "autocast_context",
    "build_batchers",
    "check_runtime",
    "count_labels",
    "evaluate",
    "forward_backward",
    "load_checkpoint",
    "lr_lambda",
    "mask_for_mlm",
    "param_groups",
    "resolve_device",
    "save_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What callbacks see. Tensors are not ``.item()``'d: reading them is the callback's sync."""

    config: TrainConfig
    model: nn.Module  # the bare model (not the DDP wrapper): module names as in model.py
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rank: int = 0
    world_size: int = 1
    step: int = 0  # optimizer steps done
    loss: Tensor | None = None  # 0-d, this step's mean loss over its micro-batches
    tokens: int = 0  # input tokens this step on this rank (padding excluded)
    padding_frac: float = 0.0  # fraction of this step's input positions that are padding
    grad_norm: Tensor | None = None  # 0-d pre-clip global norm; None when not clipping
    lr: float = 0.0
    val_loss: float | None = None
    should_stop: bool = False
    data_time: float = 0.0  # seconds spent fetching this step's batches
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler (disabled otherwise)
    batch: Any = None  # this step's micro-batches (kept by the Monitor's forensics)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    model: nn.Module
    checkpoint: Path | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)


def _call(callbacks: Sequence[object], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def train(
    cfg: TrainConfig,
    callbacks: Sequence[object] = (),
    *,
    batch_transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> TrainResult:
    """Train the reference Transformer; see the module docstring.

    Args:
        cfg: all settings.
        callbacks: objects with any of on_train_start / on_step_end / on_eval / on_train_end,
            each called with the :class:`TrainState`. A callback may set ``state.should_stop``.
        batch_transform: applied to every training micro-batch (host tensors) before use.

    Returns:
        TrainResult with the final losses and the trained (bare) model.

    Raises:
        ValueError: settings this machine cannot run (see :func:`check_runtime`).
        DataError: the corpus is missing or too small for one step's batches.
        ResumeError: ``resume`` with a checkpoint written for another model, or one that a
            weights-only load refuses.
    """
    check_runtime(cfg)
    rank, world, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = Transformer(cfg.model).to(device)  # same seed on every rank: same init
    if world > 1:  # ... but each rank its own dropout masks, as its own data
        torch.manual_seed(cfg.seed + rank)
    train_b, val_b = build_batchers(cfg, rank, world)
    val_set = eval_batches(val_b, cfg.eval_batches)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    stopper = EarlyStopping(
        patience=cfg.early_stopping_patience, min_delta=cfg.early_stopping_min_delta
    )
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    state = TrainState(
        config=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        rank=rank,
        world_size=world,
        lr=scheduler.get_last_lr()[0],
        device=device,
        scaler=scaler,
    )
    ckpt = None
    if cfg.out_dir:
        ckpt = Checkpointer(Path(cfg.out_dir) / CHECKPOINT_FILE, state, stopper, callbacks)
    record = ckpt.resume() if ckpt is not None and cfg.resume else RunRecord()
    batches = StepBatches(train_b, cfg, rank=rank, device=device, transform=batch_transform)

    model.train()
    _call(callbacks, "on_train_start", state)
    if ckpt is not None:
        ckpt.restore_callbacks(record)  # after on_train_start: the callbacks are set up
    # agreed by all ranks (DDP: a rank that left alone would hang the others); every rank
    # read the same checkpoint, so a resumed early stop is agreed too.
    stop = record.stopped_early
    while state.step < cfg.steps and not stop:
        t0 = time.perf_counter()
        batch = batches(state.step)
        state.tokens, state.padding_frac = batch.tokens, batch.padding_frac
        state.batch = batch.micro
        state.data_time = time.perf_counter() - t0
        loss = forward_backward(
            ddp_model,
            batch.micro,
            causal=cfg.model.causal,
            precision=cfg.precision,
            label_smoothing=cfg.label_smoothing,
            scaler=scaler,
            distributed=world > 1,
            n_labels=batch.n_labels,
        )
        state.grad_norm = optimizer_step(
            model, optimizer, scheduler, scaler, grad_clip=cfg.grad_clip
        )
        state.step, state.loss, state.lr = state.step + 1, loss, scheduler.get_last_lr()[0]
        state.val_loss = None
        _call(callbacks, "on_step_end", state)

        is_last = state.step >= cfg.steps
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last:
            state.val_loss = evaluate(model, val_set, cfg, device)
            record.val_history.append((state.step, state.val_loss))
            if stopper.update(state.val_loss):
                state.should_stop = record.stopped_early = True
                if rank == 0:
                    logger.info(
                        "early stopping at step %d: val/loss has not improved on %.4f for %d "
                        "evaluations",
                        state.step,
                        stopper.best,
                        stopper.bad_evals,
                    )
            _call(callbacks, "on_eval", state)
        if world == 1:
            stop = state.should_stop
        elif state.step % cfg.log_every == 0 or state.val_loss is not None or is_last:
            # Any rank may have been asked to stop (SIGTERM, a callback): all stop together,
            # at the next log step.
            stop = state.should_stop = agree_stop(state.should_stop, world=world, device=device)
        # The same decision on every rank (step counts and the agreed stop): saving gathers
        # every rank's RNG state, a collective.
        every = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
        if ckpt is not None and (every or is_last or stop):
            ckpt.save(record)

    _call(callbacks, "on_train_end", state)
    final_loss = state.loss.item() if state.loss is not None else None  # host sync (end)
    return TrainResult(
        steps=state.step,
        final_loss=final_loss,
        val_loss=record.val_history[-1][1] if record.val_history else None,
        best_val_loss=stopper.best,
        stopped_early=record.stopped_early,
        model=model,
        checkpoint=ckpt.path if ckpt is not None and ckpt.path.exists() else None,
        val_history=record.val_history,
    )


_CLI_NAMES = frozenset(
    {"main", "build_parser", "config_from_args", "sample_text", "demo_command", "demo_config"}
    | {"DEMO_STEPS"}
)


def __getattr__(name: str) -> Any:
    # The command line imports this module (for train()): its names resolve lazily here.
    if name in _CLI_NAMES:
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
