"""Where the reference trainer runs: the device, the settings this machine cannot run, and
DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig


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


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under ``torchrun``."""
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


def agree_stop(should_stop: bool, *, world: int, device: torch.device) -> bool:
    """True on every rank when any rank asked to stop (SIGTERM, a callback): a collective
    under DDP, called at the same steps on every rank (a rank that left alone would hang
    the others)."""
    if world == 1:
        return should_stop
    flag = torch.tensor([float(should_stop)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())  # host sync (log steps only)
