"""Run under torchrun by test_rm_train.py.

1. Rank 0 alone asks to stop; all ranks must stop.
2. Stop + resume equals an uninterrupted run on every rank (documents of unequal lengths and
   dropout: each rank must get its own RNG stream back from the checkpoint).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reference_model.config import ModelConfig
from reference_model.train import TrainConfig, train


class StopOnRankZero:
    def on_step_end(self, state) -> None:
        if state.rank == 0 and state.step == 3:
            state.should_stop = True


class Losses:
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[torch.Tensor] = []
        self.stop_at = stop_at

    def on_step_end(self, state) -> None:
        self.losses.append(state.loss.detach().clone())
        if state.step == self.stop_at:
            state.should_stop = True


def resume_equals_uninterrupted(cfg: TrainConfig, root: Path) -> bool:
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dropout=0.2),
        batching="documents",
        bucket=False,
        steps=4,
        log_every=1,
        resume=True,
    )
    whole = Losses()
    train(dataclasses.replace(cfg, out_dir=str(root / "whole")), [whole])
    parts = Losses(stop_at=2)
    train(dataclasses.replace(cfg, out_dir=str(root / "parts")), [parts])
    train(dataclasses.replace(cfg, out_dir=str(root / "parts")), [parts])
    return len(parts.losses) == 4 and torch.equal(
        torch.stack(parts.losses), torch.stack(whole.losses)
    )


if __name__ == "__main__":
    cfg = TrainConfig(
        model=ModelConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=32),
        batch_size=4,
        steps=50,
        log_every=2,
        eval_every=0,
        eval_batches=1,
        data_max_bytes=200_000,
        device="cpu",
        quiet=True,
        out_dir=sys.argv[1],
    )
    result = train(cfg, [StopOnRankZero()])
    print(f"rank {dist.get_rank()} stopped at {result.steps}")
    same = resume_equals_uninterrupted(cfg, Path(sys.argv[1]))
    print(f"rank {dist.get_rank()} resume equal {same}")
    dist.barrier()  # leave together (rank 0 hosts the store)
    dist.destroy_process_group()
