"""The batches of each optimizer step: the two batchers built from the corpus, sharded over
ranks, and the encoder's random corruption. Every step's batches are a deterministic
function of (seed, rank, step), so a resumed run sees exactly what an uninterrupted one saw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig
from .data import (
    ChunkBatcher,
    DataError,
    DocumentBatcher,
    load_corpus,
    split_documents,
    token_stream,
)
from .model import IGNORE_INDEX


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


def mlm_seeded(gen: torch.Generator, seed: int, rank: int, index: int) -> torch.Generator:
    """``gen`` seeded for micro-batch ``index`` of ``rank``: independent of what ran before."""
    return gen.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + index)


def count_labels(batch: dict[str, Tensor], *, causal: bool) -> int:
    """Number of predicted positions in a host batch (no device sync)."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


@dataclass
class StepBatch:
    """One optimizer step's micro-batches (on the device) and their host-side counts."""

    micro: list[dict[str, Tensor]]
    tokens: int  # input tokens on this rank (padding excluded)
    padding_frac: float  # fraction of the input positions that are padding
    n_labels: int  # predicted positions (the loss's denominator)


class StepBatches:
    """``batches(step)``: the micro-batches of optimizer step ``step`` on this rank.

    Args:
        batcher: the training batcher (``.batch(i)`` of host tensors).
        transform: applied to every micro-batch (host tensors) before use.
    """

    def __init__(
        self,
        batcher: Any,
        cfg: TrainConfig,
        *,
        rank: int,
        device: torch.device,
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> None:
        self.batcher, self.cfg, self.rank, self.device = batcher, cfg, rank, device
        self.transform = transform
        self._mlm_gen = torch.Generator()

    def __call__(self, step: int) -> StepBatch:
        cfg, first = self.cfg, step * self.cfg.grad_accum
        micro = [self.batcher.batch(i) for i in range(first, first + cfg.grad_accum)]
        if self.transform is not None:
            micro = [self.transform(b) for b in micro]
        causal = cfg.model.causal
        if not causal:
            micro = [
                mask_for_mlm(
                    b, cfg.mlm_prob, mlm_seeded(self._mlm_gen, cfg.seed, self.rank, first + i)
                )
                for i, b in enumerate(micro)
            ]
        positions = sum(b["input_ids"].numel() for b in micro)
        tokens = sum(  # host tensors: no device sync
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for b in micro
        )
        n_labels = sum(count_labels(b, causal=causal) for b in micro)  # host tensors: no sync
        return StepBatch(
            micro=[{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro],
            tokens=tokens,
            padding_frac=1.0 - tokens / max(positions, 1),
            n_labels=n_labels,
        )
