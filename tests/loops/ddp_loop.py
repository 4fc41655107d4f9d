"""A DDP training loop with the Monitor, run by test_torchrun_loop.py under
``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_loop.py OUT`` (gloo, CPU).

Two runs, one after the other, each with its own Monitor:

- ``OUT/slow``: rank 1 sleeps ``SLEEP_S`` in its data fetch on every step (a slow loader);
- ``OUT/balanced``: no planted delay.

Every rank creates the Monitor (run folder ``OUT/<run>/rank<r>``, so that a file written by
rank 1 would show) and writes what it knows to ``OUT/<run>/truth<r>.json``: its per-step
losses and the pre-clip norm ``clip_grad_norm_`` returned (of the all-reduced gradients).
The loop does not pass that norm to the Monitor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import TinyGPT, batch, lm_loss, quiet_options  # this file's folder is on sys.path
from torch.nn.parallel import DistributedDataParallel

from tdiag import Monitor

STEPS, LOG_EVERY, CLIP, SLEEP_S = 40, 2, 0.02, 0.05


def fetch(rank: int, step: int, slow: bool) -> torch.Tensor:
    """This rank's batch for ``step``; a slow loader on rank 1 when ``slow``."""
    if slow and rank == 1:
        time.sleep(SLEEP_S)
    return batch(1000 * rank + step, size=8, seq=64)


def run(out: Path, rank: int, *, slow: bool) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    # a forward of ~10 ms on one CPU thread: per-rank timer noise is small next to it
    model = DistributedDataParallel(TinyGPT(d=128, layers=2, heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opts = quiet_options(out / f"rank{rank}", log_every=LOG_EVERY)
    mon = Monitor(model, opt, config={"grad_clip": CLIP}, **opts)
    losses, norms, tokens = [], [], []
    for step in range(1, STEPS + 1):
        ids = fetch(rank, step, slow)
        loss = lm_loss(model(ids), ids)
        loss.backward()  # DDP all-reduces the gradients here
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss, tokens=ids.numel())
        losses.append(loss.item())  # ground truth for the test: a host sync, after mon.step
        norms.append(float(norm))
        tokens.append(ids.numel())
    mon.close()
    truth = {
        "config": {"log_every": LOG_EVERY, "clip": CLIP, "sleep_s": SLEEP_S},
        "losses": losses,
        "norms": norms,
        "tokens": tokens,
        "findings": [f.id for f in mon.findings],
    }
    (out / f"truth{rank}.json").write_text(json.dumps(truth))


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(sys.argv[1])
    for name, slow in (("slow", True), ("balanced", False)):
        (root / name).mkdir(parents=True, exist_ok=True)
        run(root / name, rank, slow=slow)
        dist.barrier()
    # Rank 0 hosts the TCP store: leave together, or rank 1 aborts in gloo's teardown.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
