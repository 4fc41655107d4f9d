"""Aggregation across ranks under torchrun: one collective per log step.

Every rank packs its log-step values into one flat float32 vector (see
:class:`tdiag.monitor.metrics.DeviceBatch`); :func:`gather_rows` runs ONE
``all_gather_into_tensor`` (or ``all_gather`` on backends without it) so that every rank
holds every rank's vector, then one host transfer. Each entry is then combined on the host
by its rule (:func:`combine`): mean loss, summed tokens, max memory, per-rank step times.
A NaN on one rank propagates through the mean, so every rank sees it.

Global gradient norm: under DDP the gradients are all-reduced before ``optimizer.step()``,
so each rank's local norm is the global one (combined by ``mean``). Under FSDP2 the
gradients are ``DTensor`` shards: each rank contributes ``||local shard||²`` and the squares
are summed over ranks before the square root (see ``GradientProbe``) — the same number as
``grad.full_tensor().norm()`` without materialising the full gradient.

Final flushes (close after a signal or an exception) run no collective: ranks may stop at
different steps, and a collective there could hang until torchrun's SIGKILL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["RankInfo", "combine", "gather_rows", "rank_info", "step_time_metrics"]


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """The current rank and world size from ``torch.distributed`` (when initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return RankInfo()


def collective_device(default: torch.device) -> torch.device:
    """Where the gathered vector must live for the process group's backend."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        if default.type == "cuda":
            return default
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(vector: torch.Tensor, info: RankInfo) -> list[list[float]]:
    """Every rank's copy of ``vector`` as host lists, ``rows[r]`` = rank r's values.

    One collective (when distributed) and one host transfer.
    """
    if not info.distributed:
        return [vector.tolist()]  # host sync (the one per log step)
    import torch.distributed as dist

    vec = vector.to(collective_device(vector.device))
    out = torch.empty((info.world_size, vec.numel()), dtype=vec.dtype, device=vec.device)
    if hasattr(dist, "all_gather_into_tensor") and vec.device.type != "cpu":
        dist.all_gather_into_tensor(out, vec)
    else:
        dist.all_gather(list(out.unbind(0)), vec)
    return out.tolist()  # host sync (the one per log step)


def _nanaware(op, values: Sequence[float]) -> float:
    # NaN must win (a NaN on any rank is seen by all): Python's max/min would ignore it by order.
    if any(v != v for v in values):
        return math.nan
    return op(values)


def combine(per_rank: Sequence[Sequence[float]], reduce: str) -> list[float]:
    """Combine ``per_rank[r][i]`` element-wise over ranks by ``reduce``.

    Args:
        per_rank: one equal-length list per rank.
        reduce: ``mean`` | ``sum`` | ``max`` | ``min`` | ``rank0``.
    """
    if reduce == "rank0" or len(per_rank) == 1:
        return list(per_rank[0])
    cols = list(zip(*per_rank, strict=True))
    if reduce == "mean":
        return [math.fsum(c) / len(c) for c in cols]
    if reduce == "sum":
        return [math.fsum(c) for c in cols]
    if reduce == "max":
        return [_nanaware(max, c) for c in cols]
    if reduce == "min":
        return [_nanaware(min, c) for c in cols]
    raise ValueError(f"unknown reduce {reduce!r}")


def step_time_metrics(
    step_time_per_rank: Sequence[float],
    *,
    data: Sequence[float] | None = None,
    compute: Sequence[float] | None = None,
) -> dict[str, float]:
    """Per-rank timing of one log interval (seconds; see docs/metrics.md).

    ``dist/step_time_max`` / ``dist/step_time_min``: mean step time of the interval on the
    slowest / fastest rank. Step times include the wait in the gradient all-reduce, so they
    even out across ranks; a rank's *own* time does not: ``dist/data_time/<r>`` (mean time
    from ``step()`` to the next forward, per step) and ``dist/compute_time/<r>`` (the log
    step's forward, see timing.py), with their ``_max`` / ``_min`` over ranks.
    ``dist/slowest_rank``: the rank with the largest data + compute time when those differ
    across ranks more than the step times do (DDP evens step times out), else the one with
    the largest step time.
    """
    n = len(step_time_per_rank)
    if n < 2:
        return {}
    slowest = max(range(n), key=lambda r: step_time_per_rank[r])
    out = {
        "dist/step_time_max": float(step_time_per_rank[slowest]),
        "dist/step_time_min": float(min(step_time_per_rank)),
    }
    own = [0.0] * n
    measured = False
    for name, values in (("data_time", data), ("compute_time", compute)):
        if values is None or len(values) != n:
            continue
        finite = [float(v) for v in values if math.isfinite(v)]
        if not finite:
            continue
        measured = True
        for r, v in enumerate(values):
            if math.isfinite(v):
                out[f"dist/{name}/{r}"] = float(v)
                own[r] += float(v)
        out[f"dist/{name}_max"] = max(finite)
        out[f"dist/{name}_min"] = min(finite)
    # The rank that makes the others wait: by own time under a collective that evens step
    # times out (DDP), by step time where step times differ more (no gradient sync).
    step_spread = max(step_time_per_rank) - min(step_time_per_rank)
    if measured and max(own) - min(own) > step_spread:
        slowest = max(range(n), key=lambda r: own[r])
    out["dist/slowest_rank"] = float(slowest)
    return out
