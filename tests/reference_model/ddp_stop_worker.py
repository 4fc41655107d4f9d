"""Run under torchrun by test_rm_train.py: rank 0 alone asks to stop; all ranks must stop."""

from __future__ import annotations

import sys

import torch.distributed as dist

from reference_model.config import ModelConfig
from reference_model.train import TrainConfig, train


class StopOnRankZero:
    def on_step_end(self, state) -> None:
        if state.rank == 0 and state.step == 3:
            state.should_stop = True


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
    dist.barrier()  # leave together (rank 0 hosts the store)
    dist.destroy_process_group()
