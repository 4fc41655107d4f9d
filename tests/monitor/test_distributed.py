"""Two gloo processes on CPU: aggregation across ranks, one writer, a NaN seen by all."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tdiag import Monitor

from .conftest import TinyGPT, lm_loss, make_batch, quiet_options

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        result = {
            "rank": rank,
            **_plain_phase(rank, Path(out)),
            **_ddp_phase(rank, Path(out)),
            **_fsdp_phase(rank, Path(out)),
            **_desync_phase(rank, Path(out)),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        # Rank 0 hosts the TCP store: leaving before rank 1 is done with it aborts rank 1
        # ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _plain_phase(rank: int, out: Path) -> dict:
    """No gradient sync: rank 1 is slow and its loss goes NaN at step 6."""
    torch.manual_seed(rank)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    mon = Monitor(model, opt, **quiet_options(out / f"plain{rank}", log_every=4))
    for step in range(1, 9):
        ids = make_batch(step * 10 + rank)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 1:
            time.sleep(0.08)
            if step == 6:
                loss = loss.detach() * float("nan")
        losses.append(loss.item())
        mon.step(loss, tokens=ids.numel())
    mon.close()
    return {
        "losses": losses,
        "plain_metrics": mon.last_metrics,
        "plain_findings": [f.id for f in mon.findings],
    }


def _ddp_phase(rank: int, out: Path) -> dict:
    """DDP: the global gradient norm is the norm of the all-reduced gradients."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyGPT())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    naive = []
    mon = Monitor(model, opt, **quiet_options(out / f"ddp{rank}", log_every=4))
    for step in range(1, 5):
        ids = make_batch(step * 10 + rank)
        lm_loss(model(ids), ids).backward()
        sq = sum(p.grad.double().pow(2).sum().item() for p in model.parameters())
        naive.append(math.sqrt(sq))
        opt.step()
        opt.zero_grad()
        mon.step(torch.tensor(1.0 + rank), tokens=ids.numel())
    mon.close()
    return {
        "ddp_naive_norm": naive[-1],
        "ddp_metrics": mon.last_metrics,
        "ddp_findings": [f.id for f in mon.findings],
    }


def _desync_phase(rank: int, out: Path) -> dict:
    """DDP, but rank 1 changes a weight outside the optimizer after step 5 (an EMA or a
    re-initialisation on one rank): the replicas differ from then on."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyGPT())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, **quiet_options(out / f"desync{rank}", log_every=4))
    for step in range(1, 9):
        ids = make_batch(step * 10 + rank)
        lm_loss(model(ids), ids).backward()
        opt.step()
        opt.zero_grad()
        if rank == 1 and step == 5:
            with torch.no_grad():
                model.module.lm_head.weight.mul_(0.999)
        mon.step(torch.tensor(1.0), tokens=ids.numel())
    mon.close()
    found = [f for f in mon.findings if f.id == "dist.weights-desync"]
    return {
        "desync_findings": [f.id for f in mon.findings],
        "desync_where": found[0].where if found else None,
        "desync_step": found[0].step if found else None,
        "desync_rank": found[0].evidence["rank"] if found else None,
    }


def _fsdp_phase(rank: int, out: Path) -> dict:
    """FSDP2: gradients are DTensor shards; squared local norms are summed over ranks."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, **quiet_options(out / f"fsdp{rank}", log_every=2, watch="layers"))
    ids = make_batch(rank)
    lm_loss(model(ids), ids).backward()
    full = {n: p.grad.full_tensor().double() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    mon.step(torch.tensor(1.0))
    mon.close()
    return {
        "fsdp_naive_norm": math.sqrt(sum(g.pow(2).sum().item() for g in full.values())),
        "fsdp_naive_lm_head": full["lm_head.weight"].norm().item(),
        "fsdp_metrics": mon.last_metrics,
    }


@pytest.mark.slow
def test_two_ranks_gloo(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    m0, m1 = r0["plain_metrics"], r1["plain_metrics"]
    # a NaN on rank 1 is seen by every rank
    assert r0["plain_findings"] == r1["plain_findings"] == ["train.nonfinite-loss"]
    # the last interval (steps 5-8) is aggregated identically on both ranks
    assert math.isnan(m0["train/loss"]) and math.isnan(m1["train/loss"])
    assert m0["train/loss_last"] == pytest.approx((r0["losses"][-1] + r1["losses"][-1]) / 2)
    assert m0["train/tokens"] == m1["train/tokens"] == 2 * 8 * 64
    assert m0["dist/slowest_rank"] == m1["dist/slowest_rank"] == 1.0
    assert m0["dist/step_time_max"] > m0["dist/step_time_min"] + 0.02
    # only rank 0 writes
    assert (tmp_path / "plain0" / "run" / "history.jsonl").exists()
    assert (tmp_path / "plain0" / "run" / "meta.json").exists()
    assert not (tmp_path / "plain1").exists()
    meta = json.loads((tmp_path / "plain0" / "run" / "meta.json").read_text())
    assert meta["environment"]["world_size"] == 2
    # DDP: gradients are all-reduced, the local norm is the global one
    d0, d1 = r0["ddp_metrics"], r1["ddp_metrics"]
    assert d0["train/grad_norm"] == pytest.approx(r0["ddp_naive_norm"], rel=1e-4)
    assert d0["train/grad_norm"] == pytest.approx(d1["train/grad_norm"], rel=1e-6)
    assert d0["train/loss"] == 1.5  # mean over ranks of 1.0 and 2.0
    # replicas in sync: no dist.weights-desync (nor any loop finding); out of sync: named
    assert r0["ddp_findings"] == r1["ddp_findings"] == []
    assert r0["desync_findings"] == r1["desync_findings"] == ["dist.weights-desync"]
    assert r0["desync_where"] == "module.lm_head.weight"
    assert r0["desync_step"] == 8 and r0["desync_rank"] == 1
    # FSDP2: computed across shards, equal to the norm of the full gradient
    f0, f1 = r0["fsdp_metrics"], r1["fsdp_metrics"]
    assert f0["train/grad_norm"] == pytest.approx(r0["fsdp_naive_norm"], rel=1e-5)
    assert f1["train/grad_norm"] == pytest.approx(r0["fsdp_naive_norm"], rel=1e-5)
    assert f0["grad_norm/lm_head"] == pytest.approx(r0["fsdp_naive_lm_head"], rel=1e-5)
    assert 0 < f0["train/update_ratio"] < 1e-2
