"""Training loop of the reference Transformer, plain PyTorch, top to bottom.

AdamW with weight-decay groups, warmup + cosine or Noam schedules, gradient clipping, label
smoothing, gradient accumulation, mixed precision (bf16 autocast; fp16 + GradScaler on CUDA),
activation checkpointing, validation, early stopping, atomic checkpoints resumed exactly,
and DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on CUDA).

``train()`` knows nothing of tdiag: observers plug in as callbacks (plain objects with any of
``on_train_start(state)``, ``on_step_end(state)``, ``on_eval(state)``, ``on_train_end(state)``).
The entry points (``main()``, ``demo_command()``) attach tdiag's Monitor the way a user would.

    python -m reference_model.train --help
    torchrun --nproc_per_node 2 -m reference_model.train --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference_model.config import ModelConfig
from reference_model.data import (
    ChunkBatcher,
    DataError,
    DocumentBatcher,
    eval_batches,
    load_corpus,
    split_documents,
    token_stream,
)
from reference_model.model import IGNORE_INDEX, Transformer, lm_loss

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every flag of the training loop (``python -m reference_model.train --help``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # data
    data: str | None = _f(None, "Text file or folder; default: the Python standard library source.")
    data_max_bytes: int = _f(3_000_000, "Read at most this many bytes of corpus.")
    batching: str = _f(
        "chunks", "'chunks' (fixed-length stream chunks) or 'documents' (padded, bucketed)."
    )
    bucket: bool = _f(True, "Length-bucketing sampler in 'documents' mode.")
    seq_len: int | None = _f(None, "Training sequence length; default: model.max_seq_len.")
    batch_size: int = _f(16, "Sequences per micro-batch (per rank).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    # optimisation
    steps: int = _f(200, "Optimizer steps.")
    lr: float = _f(1e-3, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor, as a fraction of lr.")
    schedule: str = _f(
        "cosine", "'cosine' (linear warmup then cosine), 'noam' (inverse sqrt), 'constant'."
    )
    warmup_steps: int = _f(20, "Linear warmup steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy.")
    precision: str = _f(
        "fp32", "'fp32', 'bf16' (autocast, CPU or CUDA) or 'fp16' (CUDA, GradScaler)."
    )
    mlm_prob: float = _f(
        0.15, "Encoder (causal=False) only: fraction of tokens corrupted to predict."
    )
    # evaluation, stopping, checkpoints
    eval_every: int = _f(
        50, "Evaluate on the validation split every N steps (0 = only at the end)."
    )
    eval_batches: int = _f(8, "Validation batches per evaluation.")
    early_stopping_patience: int = _f(0, "Stop after N evaluations without improvement (0 = off).")
    early_stopping_min_delta: float = _f(0.0, "Improvement smaller than this does not count.")
    out_dir: str | None = _f(None, "Run folder (checkpoints); None = write nothing.")
    checkpoint_every: int = _f(
        0, "Write a checkpoint every N steps (0 = only at the end, if out_dir)."
    )
    resume: bool = _f(False, "Resume from out_dir/checkpoint.pt when it exists.")
    # runtime
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'.")
    seed: int = _f(0, "Random seed.")
    log_every: int = _f(10, "Log (one host sync) every N steps.")
    quiet: bool = _f(False, "No progress output.")

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "grad_accum",
            "steps",
            "log_every",
            "eval_batches",
            "data_max_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.batching not in ("chunks", "documents"):
            raise ValueError(f"batching must be 'chunks' or 'documents', got {self.batching!r}")
        if self.schedule not in ("cosine", "noam", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'noam' or 'constant', got {self.schedule!r}"
            )
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        non_negative = (
            "grad_clip",
            "warmup_steps",
            "eval_every",
            "weight_decay",
            "early_stopping_patience",
            "early_stopping_min_delta",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"mlm_prob must be in (0, 1), got {self.mlm_prob!r}")
        if (self.resume or self.checkpoint_every) and not self.out_dir:
            raise ValueError("resume and checkpoint_every need out_dir (where checkpoints live)")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len!r}")
        if (
            self.seq_len is not None
            and self.seq_len > self.model.max_seq_len
            and (self.model.pos_encoding == "learned")
        ):
            raise ValueError(
                f"seq_len {self.seq_len} > max_seq_len {self.model.max_seq_len} with learned positions"
            )

    @property
    def train_seq_len(self) -> int:
        return self.seq_len or self.model.max_seq_len


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


# --------------------------------------------------------------------------- building blocks


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def check_runtime(cfg: TrainConfig) -> None:
    """Settings this machine cannot run (raised before anything is built).

    Raises:
        ValueError: CUDA requested but absent; fp16 without CUDA; a --data path that does
            not exist.
    """
    if cfg.data is not None and not Path(cfg.data).exists():
        raise ValueError(f"data path does not exist: {cfg.data!r}")
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs CUDA (use 'bf16' on a CPU)")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def mask_for_mlm(
    batch: dict[str, Tensor], prob: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Encoder objective: corrupt a fraction of real tokens to random bytes, predict the originals.

    The trainer seeds ``generator`` from (seed, rank, micro-batch index), so the corruption of
    a batch does not depend on what ran before it: a resumed run corrupts exactly as an
    uninterrupted one.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    pick = (torch.rand(ids.shape, generator=generator) < prob) & mask
    noise = torch.randint(0, 256, ids.shape, generator=generator)
    labels = ids.masked_fill(~pick, IGNORE_INDEX)
    return {**batch, "input_ids": torch.where(pick, noise, ids), "labels": labels}


def build_batchers(cfg: TrainConfig, rank: int, world: int) -> tuple[Any, Any]:
    """Training batcher (sharded over ranks) and validation batcher (unshuffled).

    A small validation split gets smaller batches rather than an error.

    Raises:
        DataError: the corpus is missing, or a split is too small (the message names it).
    """
    corpus = load_corpus(cfg.data, max_bytes=cfg.data_max_bytes)
    L = cfg.train_seq_len
    try:
        if cfg.batching == "chunks":
            train_b: ChunkBatcher | DocumentBatcher = ChunkBatcher(
                token_stream(corpus.train),
                batch_size=cfg.batch_size,
                seq_len=L,
                seed=cfg.seed,
                rank=rank,
                world_size=world,
            )
        else:
            train_b = DocumentBatcher(
                split_documents(corpus.train),
                batch_size=cfg.batch_size,
                max_seq_len=L,
                seed=cfg.seed,
                rank=rank,
                world_size=world,
                bucket=cfg.bucket,
            )
    except DataError as e:
        raise DataError(f"training split of {corpus.source}: {e}") from None
    try:
        if cfg.batching == "chunks":
            val_stream = token_stream(corpus.val)
            val_b: ChunkBatcher | DocumentBatcher = ChunkBatcher(
                val_stream,
                batch_size=max(1, min(cfg.batch_size, len(val_stream) // L)),
                seq_len=L,
                shuffle=False,
            )
        else:
            val_docs = split_documents(corpus.val)
            val_b = DocumentBatcher(
                val_docs,
                batch_size=max(1, min(cfg.batch_size, len(val_docs))),
                max_seq_len=L,
                shuffle=False,
            )
    except DataError as e:
        raise DataError(f"validation split of {corpus.source}: {e}") from None
    return train_b, val_b


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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under DDP; checkpoint steps only)."""
    if world == 1:
        return [_rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def count_labels(batch: dict[str, Tensor], *, causal: bool) -> int:
    """Number of predicted positions in a host batch (no device sync)."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


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


class ResumeError(ValueError):
    """The checkpoint in out_dir cannot be resumed with this configuration."""


def _check_resumable(path: Path, ck: dict[str, Any], cfg: TrainConfig) -> None:
    saved = ck.get("config", {}).get("model", {})
    diffs = {
        k: (saved.get(k), v)
        for k, v in asdict(cfg.model).items()
        if k not in ("activation_checkpointing", "dropout") and saved.get(k) != v
    }
    if diffs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ResumeError(
            f"{path} was written for another model ({shown}); "
            "resume with the same model flags or use another --out-dir"
        )


def _mlm_seeded(gen: torch.Generator, seed: int, rank: int, index: int) -> torch.Generator:
    return gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + index)


def _callback_key(index: int, cb: object) -> str:
    return f"{index}:{type(cb).__name__}"


def _call(callbacks: Sequence[object], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _micro_batches(
    batcher: Any, start: int, n: int, transform: Callable[[dict], dict] | None
) -> Iterator[dict[str, Tensor]]:
    for i in range(start, start + n):
        batch = batcher.batch(i)
        yield transform(batch) if transform is not None else batch


def _setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# --------------------------------------------------------------------------- the loop


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
        ResumeError: ``resume`` with a checkpoint written for another model.
    """
    check_runtime(cfg)
    rank, world, device = _setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model = Transformer(cfg.model).to(device)  # same seed on every rank: same init
    if world > 1:  # ... but each rank its own dropout masks, as its own data
        torch.manual_seed(cfg.seed + rank)
    train_b, val_b = build_batchers(cfg, rank, world)
    val_set = eval_batches(val_b, cfg.eval_batches)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    stopper = EarlyStopping(
        patience=cfg.early_stopping_patience, min_delta=cfg.early_stopping_min_delta
    )
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_FILE if cfg.out_dir else None
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
    val_history: list[tuple[int, float]] = []
    stopped_early = False
    callback_states: dict[str, Any] = {}
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resumable(ckpt_path, ck, cfg)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ck["scaler"]:  # empty when saved by a disabled scaler (an fp32/bf16 run)
            scaler.load_state_dict(ck["scaler"])
        stopper.load_state_dict(ck["early_stopping"])
        per_rank = ck.get("rng_per_rank") or []
        _set_rng_state(per_rank[rank] if len(per_rank) == world else ck["rng"])
        state.step, state.lr = int(ck["step"]), scheduler.get_last_lr()[0]
        val_history = [(int(s), float(v)) for s, v in ck["val_history"]]
        stopped_early = bool(ck.get("stopped_early", False))
        callback_states = ck.get("callbacks") or {}
        if rank == 0:
            logger.info("resumed from %s at step %d", ckpt_path, state.step)
            if stopped_early:
                logger.info("that run had stopped early (no val/loss improvement): not resuming")

    def checkpoint_payload(rng_per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,  # DDP: every rank resumes its own dropout stream
            "step": state.step,
            "config": asdict(cfg),
            "val_history": [list(x) for x in val_history],
            "stopped_early": stopped_early,
            # observers with state (the tdiag Monitor): resumed with the run
            "callbacks": {
                _callback_key(i, cb): cb.state_dict()
                for i, cb in enumerate(callbacks)
                if callable(getattr(cb, "state_dict", None))
            },
        }

    mlm_gen = torch.Generator()
    causal = cfg.model.causal
    model.train()
    _call(callbacks, "on_train_start", state)
    for i, cb in enumerate(callbacks):  # after on_train_start: the callback is set up
        key = _callback_key(i, cb)
        if key in callback_states and callable(getattr(cb, "load_state_dict", None)):
            cb.load_state_dict(callback_states[key])
    # agreed by all ranks (DDP: a rank that left alone would hang the others); every rank
    # read the same checkpoint, so a resumed early stop is agreed too.
    stop = stopped_early
    while state.step < cfg.steps and not stop:
        t0 = time.perf_counter()
        micro = list(
            _micro_batches(train_b, state.step * cfg.grad_accum, cfg.grad_accum, batch_transform)
        )
        if not causal:
            first = state.step * cfg.grad_accum
            micro = [
                mask_for_mlm(b, cfg.mlm_prob, _mlm_seeded(mlm_gen, cfg.seed, rank, first + i))
                for i, b in enumerate(micro)
            ]
        positions = sum(b["input_ids"].numel() for b in micro)
        state.tokens = sum(  # host tensors: no device sync
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for b in micro
        )
        state.padding_frac = 1.0 - state.tokens / max(positions, 1)
        n_labels = sum(count_labels(b, causal=causal) for b in micro)  # host tensors: no sync
        micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro]
        state.data_time = time.perf_counter() - t0

        step_loss = forward_backward(
            ddp_model,
            micro,
            causal=causal,
            precision=cfg.precision,
            label_smoothing=cfg.label_smoothing,
            scaler=scaler,
            distributed=world > 1,
            n_labels=n_labels,
        )

        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            state.grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            state.grad_norm = None
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

        state.step += 1
        state.loss = step_loss
        state.lr = scheduler.get_last_lr()[0]
        state.val_loss = None
        _call(callbacks, "on_step_end", state)

        is_last = state.step >= cfg.steps
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last:
            state.val_loss = evaluate(model, val_set, cfg, device)
            val_history.append((state.step, state.val_loss))
            if stopper.update(state.val_loss):
                state.should_stop, stopped_early = True, True
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
            flag = torch.tensor([float(state.should_stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = state.should_stop = bool(flag.item())  # host sync (log steps only)
        # The same decision on every rank (step counts and the agreed stop): the RNG
        # gather below is a collective.
        if ckpt_path is not None and (
            (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or is_last or stop
        ):
            rng_states = _gather_rng_states(world)
            if rank == 0:
                save_checkpoint(ckpt_path, checkpoint_payload(rng_states))

    _call(callbacks, "on_train_end", state)
    final_loss = state.loss.item() if state.loss is not None else None  # host sync (end)
    return TrainResult(
        steps=state.step,
        final_loss=final_loss,
        val_loss=val_history[-1][1] if val_history else None,
        best_val_loss=stopper.best,
        stopped_early=stopped_early,
        model=model,
        checkpoint=ckpt_path if ckpt_path is not None and ckpt_path.exists() else None,
        val_history=val_history,
    )


# --------------------------------------------------------------------------- entry points


class PaddingMeter:
    """Mean padding fraction of the steps since the last ``take()`` (host floats only)."""

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def add(self, fraction: float) -> None:
        self.total, self.n = self.total + fraction, self.n + 1

    def take(self) -> float:
        mean = self.total / self.n if self.n else 0.0
        self.total, self.n = 0.0, 0
        return mean


class ProgressLine:
    """Fallback observer without tdiag's Monitor: one line per log interval (rank 0)."""

    def __init__(self, *, log_every: int, total: int, console: Any = None) -> None:
        from rich.console import Console

        self.log_every, self.total = log_every, total
        self.console = console or Console(stderr=True)
        self._t = time.perf_counter()
        self._tokens = 0
        self._padding = PaddingMeter()

    def on_step_end(self, state: TrainState) -> None:
        self._tokens += state.tokens
        self._padding.add(state.padding_frac)
        if state.rank != 0 or state.step % self.log_every:
            return
        dt = time.perf_counter() - self._t
        loss = state.loss.item() if state.loss is not None else float("nan")  # host sync (log step)
        padding = self._padding.take()
        pad = f"  pad {padding:.1%}" if state.config.batching == "documents" else ""
        self.console.print(
            f"step {state.step:>6}/{self.total}  loss {loss:.4f}  lr {state.lr:.2e}  "
            f"tok/s {self._tokens * state.world_size / max(dt, 1e-9):,.0f}{pad}"
        )
        self._t, self._tokens = time.perf_counter(), 0

    def on_eval(self, state: TrainState) -> None:
        if state.rank == 0:
            self.console.print(f"step {state.step:>6}  val/loss {state.val_loss:.4f}")


class MonitorCallback:
    """Drives a tdiag Monitor from the training loop, exactly as a user's own loop would.

    The Monitor needs the model and optimizer, which ``train()`` builds: ``make_monitor(state)``
    constructs it at ``on_train_start``. Use the callback as a context manager around
    ``train()`` so that a crash still closes the Monitor (flushes, writes the report).
    """

    def __init__(self, make_monitor: Callable[[TrainState], Any]) -> None:
        self.make_monitor = make_monitor
        self.mon: Any = None
        self._padding = PaddingMeter()

    def on_train_start(self, state: TrainState) -> None:
        self.mon = self.make_monitor(state)
        if state.step > 0:  # resumed: count on from the trainer's step (a checkpoint without
            # the Monitor's state; load_state_dict below restores the rest when it has it)
            self.mon.load_state_dict({"version": 1, "step": state.step, "tokens_total": 0.0})

    def state_dict(self) -> dict[str, Any]:
        """The Monitor's state, saved in the trainer's checkpoint."""
        return self.mon.state_dict() if self.mon is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mon is not None and state:
            self.mon.load_state_dict(state)

    def on_step_end(self, state: TrainState) -> None:
        self.mon.step(
            state.loss, tokens=state.tokens, grad_norm=state.grad_norm, data_time=state.data_time
        )
        if state.config.batching == "documents":
            # data/padding_frac: mean fraction of input positions that were padding over the
            # steps since the last log step (a host float: no sync).
            self._padding.add(state.padding_frac)
            if state.step == 1 or state.step % state.config.log_every == 0:
                self.mon.log({"data/padding_frac": self._padding.take()}, step=state.step)
        if self.mon.stop_requested:  # SIGTERM/SIGINT: stop, checkpoint, report
            state.should_stop = True

    def on_eval(self, state: TrainState) -> None:
        self.mon.log({"val/loss": state.val_loss}, step=state.step)

    def on_train_end(self, state: TrainState) -> None:
        self.mon.close()

    def __enter__(self) -> MonitorCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.mon is not None and exc is not None:
            self.mon.__exit__(exc_type, exc, tb)


def attach_monitor(
    cfg: TrainConfig, run_dir: Path, *, quiet: bool, watch: str | None = None
) -> MonitorCallback | None:
    """tdiag's Monitor as a callback, or None when tdiag.monitor is not importable."""
    try:
        from tdiag import Monitor
    except ImportError as e:
        logger.info("tdiag Monitor not available (%s): plain progress output", e)
        return None

    def make_monitor(state: TrainState) -> Any:
        return Monitor(
            state.model,
            optimizer=state.optimizer,
            scaler=state.scaler,
            run_dir=run_dir,
            log_every=cfg.log_every,
            total_steps=cfg.steps,
            config=asdict(cfg),
            seq_len=cfg.train_seq_len,
            watch=watch,
            quiet=quiet,
        )

    return MonitorCallback(make_monitor)


# --- command line: one flag per field of TrainConfig and ModelConfig

_MODEL_FLAGS_HELP = {
    "d_model": "Width of the residual stream.",
    "n_heads": "Attention heads.",
    "n_layers": "Transformer blocks.",
    "d_ff": "Feed-forward width (default 4*d_model, 8/3*d_model for swiglu).",
    "max_seq_len": "Longest sequence (learned positions).",
    "dropout": "Dropout probability.",
    "pos_encoding": "sinusoidal | learned | rope | none.",
    "norm": "layernorm | rmsnorm.",
    "norm_position": "pre | post.",
    "activation": "gelu | relu | swiglu.",
    "tie_embeddings": "Tie the output head to the embedding.",
    "causal": "Causal decoder (--no-causal: bidirectional encoder, denoising objective).",
    "bias": "Biases in linear layers and LayerNorm.",
    "init_std": "Std of the weight init.",
    "activation_checkpointing": "Recompute activations in backward to save memory.",
}
_SKIP_MODEL_FLAGS = {"vocab_size", "pad_id"}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, help_text: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    typ = str(f.type)
    default = f.default
    if typ == "bool":
        parser.add_argument(
            flag,
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )
        return
    base = typ.replace(" | None", "")
    conv = {"int": int, "float": float, "str": str}.get(base)
    if conv is None:  # a type this simple parser does not handle (e.g. rope_base: float already is)
        return
    parser.add_argument(
        flag, dest=f.name, type=conv, default=default, help=f"{help_text} (default: {default})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reference_model.train",
        description="Train the reference Transformer (byte-level LM on Python's stdlib by default).",
    )
    g = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            _add_field(g, f, f.metadata.get("help", ""))
    g.add_argument(
        "--no-monitor", action="store_true", help="Do not attach tdiag's Monitor (needs --out-dir)."
    )
    g.add_argument(
        "--watch", choices=["layers"], default=None, help="Monitor per-layer statistics too."
    )
    g.add_argument("--sample", type=int, default=200, help="Bytes to generate at the end (rank 0).")
    m = p.add_argument_group("model")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _SKIP_MODEL_FLAGS:
            _add_field(m, f, _MODEL_FLAGS_HELP.get(f.name, f.name.replace("_", " ") + "."))
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    model_kw = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ModelConfig)
        if hasattr(args, f.name)
    }
    train_kw = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model"
    }
    return TrainConfig(model=ModelConfig(**model_kw), **train_kw)


def sample_text(model: Transformer, prompt: str, n: int, *, seed: int = 0) -> str:
    from reference_model.data import ByteTokenizer

    tok = ByteTokenizer()
    device = next(model.parameters()).device
    ids = tok.encode(prompt)[None].to(device)
    if model.config.pos_encoding == "learned":
        n = max(0, min(n, model.config.max_seq_len - ids.shape[1]))
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, n, temperature=0.8, top_k=40, generator=g)
    return tok.decode(out[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_runtime(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    quiet = cfg.quiet or rank != 0
    mon = None
    if cfg.out_dir and not args.no_monitor:
        mon = attach_monitor(cfg, Path(cfg.out_dir), quiet=quiet, watch=args.watch)
    try:
        if mon is not None:
            with mon:
                result = train(cfg, [mon])
        else:
            progress = [] if quiet else [ProgressLine(log_every=cfg.log_every, total=cfg.steps)]
            result = train(cfg, progress)
    except (DataError, ResumeError) as e:  # raised before the first step
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0 and args.sample > 0 and cfg.model.causal:
        print(sample_text(result.model, "def ", args.sample))
    if dist.is_initialized():
        # Leave together: rank 0 hosts the rendezvous store, and a rank that tears down
        # while another still talks to it can abort ("terminate called without an active
        # exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


# --- the demo (`tdiag demo`)

DEMO_STEPS = 700


def demo_config(*, out: Path, steps: int | None, device: str, quiet: bool) -> TrainConfig:
    """Small model that learns visibly in about two minutes on a 2-core CPU."""
    return TrainConfig(
        model=ModelConfig(
            d_model=128,
            n_heads=4,
            n_layers=4,
            max_seq_len=128,
            pos_encoding="rope",
            norm="rmsnorm",
            activation="swiglu",
            bias=False,
        ),
        batch_size=16,
        steps=steps or DEMO_STEPS,
        lr=2e-3,
        warmup_steps=20,
        eval_every=100,
        eval_batches=8,
        log_every=10,
        out_dir=str(out),
        device=device,
        quiet=quiet,
    )


def demo_command(*, out: Path, steps: int | None, device: str, quiet: bool) -> int:
    """`tdiag demo`: train the reference model on the built-in corpus, with the Monitor."""
    from rich.console import Console

    console = Console()
    if steps is not None and steps <= 0:
        console.print(f"[red]error:[/] --steps must be > 0, got {steps}")
        return 2
    try:
        cfg = demo_config(out=out, steps=steps, device=device, quiet=quiet)
        check_runtime(cfg)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mon = attach_monitor(cfg, out, quiet=quiet, watch="layers")
    if mon is not None:
        with mon:
            result = train(cfg, [mon])
    else:
        result = train(cfg, [] if quiet else [_DemoProgress(cfg.steps, console)])
    if not quiet:
        console.print(
            f"trained {result.steps} steps in {time.perf_counter() - t0:.0f} s; "
            f"final train loss {result.final_loss:.3f}, val loss {result.val_loss:.3f}"
        )
        console.rule("sample")
        console.print(sample_text(result.model, "def ", 300), markup=False, highlight=False)
        console.rule()
        console.print(f"run folder: {out}")
    return 0


class _DemoProgress:
    """A rich progress bar with loss and tokens/s (used until tdiag's Monitor is available)."""

    def __init__(self, total: int, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total, info="")
        self._t, self._tokens = time.perf_counter(), 0

    def on_train_start(self, state: TrainState) -> None:
        self.progress.start()

    def on_step_end(self, state: TrainState) -> None:
        self._tokens += state.tokens
        self.progress.update(self.task, completed=state.step)
        if state.step % state.config.log_every == 0:
            loss = state.loss.item()  # host sync (log step)
            tps = self._tokens / max(time.perf_counter() - self._t, 1e-9)
            self.progress.update(self.task, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")
            self._t, self._tokens = time.perf_counter(), 0

    def on_eval(self, state: TrainState) -> None:
        self.progress.console.print(f"step {state.step}: val/loss {state.val_loss:.3f}")

    def on_train_end(self, state: TrainState) -> None:
        self.progress.stop()


if __name__ == "__main__":
    sys.exit(main())
