"""On-device accumulators and the per-log-step metric formulas of the Monitor.

The per-step path (:meth:`IntervalAccumulator.add`) writes the step's loss (and the
user's gradient norm, when given) into preallocated device buffers: one ``copy_`` each,
no host sync. Everything else — gradient norms, update/weight ratio, per-layer statistics —
is computed on log steps only, on the device, and brought to the host with ONE transfer
by :class:`DeviceBatch`.

Metric keys produced here (units; exact definitions in docs/metrics.md):
``train/loss`` (nats, mean over the steps of the interval), ``train/loss_last``,
``train/grad_norm`` (L2, at the log step, before clipping when the loop passes it),
``train/grad_norm_max`` (max over the interval, when passed per step),
``train/grad_clip_frac`` (fraction of steps of the interval whose norm exceeded the clip
threshold), ``train/skipped_steps`` (optimizer steps skipped in the interval, e.g. by a
GradScaler; count), ``train/update_ratio`` (``||Δθ||₂ / ||θ||₂`` of the log step's optimizer step),
``train/lr`` and ``train/lr/<i>``, ``perf/step_time`` and ``perf/data_time`` (seconds),
``perf/tokens_per_sec``, ``perf/mfu`` (fraction of peak).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DeviceBatch",
    "IntervalAccumulator",
    "IntervalSummary",
    "learning_rates",
    "local_sq_norm",
    "summarize_interval",
    "to_local",
]

# How each packed entry combines across ranks (see distributed.py).
REDUCE_OPS = ("mean", "sum", "max", "min", "rank0", "all")


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2), or the tensor itself."""
    local = getattr(t, "to_local", None)
    return local() if callable(local) else t


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor with a ``Shard`` placement (its local part is a piece of the whole)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``sum_i ||local(t_i)||²`` as a 0-d float32 device tensor (no host sync), or None if empty.

    On DTensors the local shards are used, so summing this over ranks gives the squared
    global norm of sharded tensors (FSDP2); for replicated tensors (DDP) every rank holds
    the whole value and the Monitor takes the mean over ranks instead.
    """
    locals_ = [to_local(t).detach() for t in tensors]
    locals_ = [t for t in locals_ if t.numel() > 0]
    if not locals_:
        return None
    return per_tensor_sq_norms(locals_).sum()


def per_tensor_sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor as float32 ``Tensor[n]`` (fused ``_foreach_norm``)."""
    with torch.no_grad():
        device = tensors[0].device
        norms = torch._foreach_norm(list(tensors))  # one launch per dtype group on CUDA
        return torch.stack([n.float().to(device) for n in norms]).square()


def learning_rates(optimizer: Any) -> dict[str, float]:
    """``train/lr`` (param group 0) and ``train/lr/<i>`` for the other groups.

    A tensor LR (capturable optimizers) is read with ``float()``: call on log steps only.
    """
    out: dict[str, float] = {}
    if optimizer is None:
        return out
    for i, group in enumerate(getattr(optimizer, "param_groups", [])):
        lr = group.get("lr")
        if lr is None:
            continue
        value = float(lr)  # host sync only if lr is a device tensor (log steps only)
        out["train/lr" if i == 0 else f"train/lr/{i}"] = value
    return out


class DeviceBatch:
    """Collect device tensors (and host floats) under names, then bring them to the host at once.

    Each entry carries how it combines across ranks (``mean``, ``sum``, ``max``, ``min``,
    ``rank0`` or ``all`` to keep every rank's value). :meth:`pack` returns one flat float32
    vector; :meth:`unpack` maps a list of per-rank value lists back to names.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, torch.Tensor | list[float], str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, value: torch.Tensor | float | Sequence[float], reduce: str) -> None:
        if reduce not in REDUCE_OPS:
            raise ValueError(f"reduce must be one of {REDUCE_OPS}, got {reduce!r}")
        if isinstance(value, torch.Tensor):
            self._entries.append((name, value.detach().reshape(-1), reduce))
        elif isinstance(value, int | float):
            self._entries.append((name, [float(value)], reduce))
        else:
            self._entries.append((name, [float(v) for v in value], reduce))

    def names(self) -> list[str]:
        return [name for name, _, _ in self._entries]

    def sizes(self) -> list[int]:
        return [v.numel() if isinstance(v, torch.Tensor) else len(v) for _, v, _ in self._entries]

    def pack(self, device: torch.device | None = None, *, with_host: bool = False) -> torch.Tensor:
        """One flat float32 vector of the tensor entries (and, ``with_host``, the host values
        too, as needed for a collective) on ``device`` (default: the first tensor's device)."""
        tensors = [v for _, v, _ in self._entries if isinstance(v, torch.Tensor)]
        if device is None:
            device = tensors[0].device if tensors else torch.device("cpu")
        parts = []
        for _, v, _ in self._entries:
            if isinstance(v, torch.Tensor):
                parts.append(v.to(device=device, dtype=torch.float32, non_blocking=True))
            elif with_host:
                parts.append(torch.tensor(v, dtype=torch.float32).to(device, non_blocking=True))
        if not parts:
            return torch.zeros(0, device=device)
        return torch.cat(parts)

    def unpack(self, rows: Sequence[Sequence[float]], *, with_host: bool = False) -> dict[str, Any]:
        """Per-rank rows (``rows[r]`` = rank r's packed vector) -> name -> combined values.

        ``all`` entries give ``[rank][i]`` lists; the others give one list of floats. Without
        ``with_host`` the host entries were not packed and are taken as they are.
        """
        from tdiag.monitor.distributed import combine

        out: dict[str, Any] = {}
        offset = 0
        for (name, value, reduce), size in zip(self._entries, self.sizes(), strict=True):
            if not with_host and not isinstance(value, torch.Tensor):
                per_rank = [list(value)]
            else:
                per_rank = [list(row[offset : offset + size]) for row in rows]
                offset += size
            out[name] = per_rank if reduce == "all" else combine(per_rank, reduce)
        return out


@dataclass
class IntervalSummary:
    """Host values of one log interval (after the one host sync)."""

    losses: list[float | None]
    """Per-step loss; None where ``step()`` got no loss."""
    grad_norms: list[float | None] | None = None
    """Per-step gradient norm from the loop; None where not given or the step was skipped."""
    step_times: list[float] = field(default_factory=list)
    data_times: list[float] = field(default_factory=list)
    skipped: list[bool] | None = None
    """Per step: the optimizer did not step (e.g. GradScaler found inf/NaN); None: unknown."""


class IntervalAccumulator:
    """Per-step values of the current log interval, kept on the device until the log step.

    Args:
        capacity: the largest number of steps in one interval (``log_every``).

    :meth:`add` keeps a detached reference to the step's loss tensor (and to the loop's
    gradient norm, when given): ``detach()`` is a view, so the per-step cost is no device
    operation at all, and no host sync. The log step stacks them (one kernel) before its
    single transfer; NaN/Inf survive, so the log step sees which step went non-finite.
    A per-token (non-scalar) loss is reduced with one ``mean`` on the device.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self.n = 0
        self._loss: list[torch.Tensor | float | None] = []
        self._gnorm: list[torch.Tensor | float | None] = []
        self.tokens = 0
        self._tokens_dev: list[torch.Tensor] = []
        self.step_times: list[float] = []
        self.data_times: list[float] = []
        self.skipped: list[bool | torch.Tensor | None] = []

    def add(
        self,
        loss: torch.Tensor | float | None,
        *,
        tokens: int | torch.Tensor | None = None,
        grad_norm: torch.Tensor | float | None = None,
        step_time: float | None = None,
        data_time: float | None = None,
        skipped: bool | torch.Tensor | None = None,
    ) -> None:
        """Record one step. No host sync for tensor arguments. ``skipped``: the optimizer
        did not step (None: unknown)."""
        if self.n >= self.capacity:
            raise RuntimeError("interval is full: call reset() after the log step")
        if isinstance(loss, torch.Tensor):
            x = loss.detach()
            self._loss.append(x if x.dim() == 0 else x.float().mean())  # per-token: reduce
        else:
            self._loss.append(None if loss is None else float(loss))
        if isinstance(grad_norm, torch.Tensor):
            self._gnorm.append(to_full(grad_norm))
        else:
            self._gnorm.append(None if grad_norm is None else float(grad_norm))
        if isinstance(tokens, torch.Tensor):
            self._tokens_dev.append(tokens.detach())
        elif tokens is not None:
            self.tokens += int(tokens)
        if step_time is not None:
            self.step_times.append(step_time)
        if data_time is not None:
            self.data_times.append(data_time)
        self.skipped.append(skipped)
        self.n += 1

    @property
    def has_grad_norms(self) -> bool:
        return any(g is not None for g in self._gnorm)

    @staticmethod
    def _stack(values: list[torch.Tensor | float | None]) -> torch.Tensor | None:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return None
        dev = tensors[0].device
        return torch.stack([t.to(dev, torch.float32).reshape(()) for t in tensors])

    def add_to(self, batch: DeviceBatch) -> None:
        """Put this interval's device values into ``batch`` (names ``acc/loss``, ``acc/gnorm``,
        ``acc/tokens``): per-step losses are averaged over ranks, tokens summed."""
        loss = self._stack(self._loss)
        if loss is not None:
            batch.add("acc/loss", loss, "mean")
        gnorm = self._stack(self._gnorm)
        if gnorm is not None:
            batch.add("acc/gnorm", gnorm, "mean")
        if self._tokens_dev:
            dev = self._tokens_dev[0].device
            total = torch.stack([t.to(dev).float().sum() for t in self._tokens_dev]).sum()
            batch.add("acc/tokens", total, "sum")
        flags = self._stack(self.skipped)  # fused optimizers' on-device found_inf
        if flags is not None:
            batch.add("acc/skipped", flags, "max")

    @staticmethod
    def _merge(
        values: list[torch.Tensor | float | None], dev: list[float] | None
    ) -> list[float | None]:
        it = iter(dev or [])
        out: list[float | None] = []
        for v in values:
            if isinstance(v, torch.Tensor):
                out.append(float(next(it)))
            else:
                out.append(None if v is None else float(v))
        return out

    def summary(self, host: Mapping[str, Any]) -> IntervalSummary:
        """Merge the host copies of the device values with the host-side values. A skipped
        step's gradient norm is dropped (None): inf/NaN there is the loss scaler's business."""
        flags = self._merge(self.skipped, host.get("acc/skipped"))
        known = [s for s in flags if s is not None]
        skipped = [s is not None and s != 0 for s in flags] if known else None
        norms = self._merge(self._gnorm, host.get("acc/gnorm")) if self.has_grad_norms else None
        if norms is not None and skipped is not None:
            norms = [None if s else g for g, s in zip(norms, skipped, strict=True)]
        return IntervalSummary(
            losses=self._merge(self._loss, host.get("acc/loss")),
            grad_norms=norms,
            step_times=list(self.step_times),
            data_times=list(self.data_times),
            skipped=skipped,
        )

    def regroup(self, groups: Sequence[int]) -> None:
        """Re-count the recorded calls as steps of ``groups[i]`` consecutive calls each (the
        micro-batches of one optimizer step, see cadence.py): a step's loss is the mean of
        its calls' losses (on the device), its grad norm the last one given, its step and
        data times the sums; tokens are totals already. Not skipped: each group ended with
        an optimizer step."""
        if sum(groups) != self.n:
            raise ValueError(f"groups {list(groups)} do not cover the {self.n} recorded calls")
        aligned = len(self.data_times) == self.n
        losses, gnorms, step_times, data_times = [], [], [], []
        start = 0
        for size in groups:
            end = start + size
            part = [v for v in self._loss[start:end] if v is not None]
            tensors = [v for v in part if isinstance(v, torch.Tensor)]
            if tensors and len(tensors) == len(part):
                dev = tensors[0].device
                losses.append(
                    torch.stack([t.to(dev, torch.float32).reshape(()) for t in tensors]).mean()
                )
            elif part:
                losses.append(math.fsum(float(v) for v in part) / len(part))  # host values
            else:
                losses.append(None)
            given = [g for g in self._gnorm[start:end] if g is not None]
            gnorms.append(given[-1] if given else None)
            step_times.append(math.fsum(self.step_times[start:end]))
            if aligned:
                data_times.append(math.fsum(self.data_times[start:end]))
            start = end
        self._loss, self._gnorm = losses, gnorms
        self.step_times = step_times
        if aligned:
            self.data_times = data_times
        self.skipped = [False] * len(groups)
        self.n = len(groups)

    def reset(self) -> None:
        """Start a new interval."""
        self.n = 0
        self._loss = []
        self._gnorm = []
        self.tokens = 0
        self._tokens_dev = []
        self.step_times = []
        self.data_times = []
        self.skipped = []


def to_full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (one collective, no host sync), else ``t``.

    ``clip_grad_norm_`` on FSDP2 parameters may return the total norm as a DTensor.
    """
    if type(t) is torch.Tensor:  # the common case, without an attribute lookup
        return t.detach()
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t.detach()


def summarize_interval(
    summary: IntervalSummary,
    *,
    clip: float | None,
    tokens: float,
    elapsed: float,
) -> dict[str, float]:
    """Interval metrics from host values.

    Args:
        summary: per-step values of the interval.
        clip: gradient clipping threshold (``train/grad_clip_frac`` needs it).
        tokens: tokens processed in the interval (all ranks).
        elapsed: wall seconds of the interval (between the host syncs of two log steps).

    Returns:
        ``train/loss``, ``train/loss_last``, ``train/grad_norm_max``, ``train/grad_clip_frac``,
        ``perf/step_time``, ``perf/data_time``, ``perf/tokens_per_sec`` — those that apply.
    """
    out: dict[str, float] = {}
    n = len(summary.losses)
    losses = [v for v in summary.losses if v is not None]
    if losses:  # mean over the steps that gave a loss
        out["train/loss"] = math.fsum(losses) / len(losses)  # NaN if any step was NaN
        out["train/loss_last"] = losses[-1]
    if summary.skipped is not None:
        out["train/skipped_steps"] = float(sum(summary.skipped))
    g = [v for v in summary.grad_norms or [] if v is not None]
    if g:
        out["train/grad_norm"] = g[-1]
        out["train/grad_norm_max"] = max(g, key=lambda v: math.inf if v != v else v)
        if clip is not None:
            # A NaN norm counts as clipped: clip_grad_norm_ scales by clip/NaN = NaN anyway.
            out["train/grad_clip_frac"] = sum(1 for v in g if not v <= clip) / len(g)
    if n and elapsed > 0:
        out["perf/step_time"] = elapsed / n
        if tokens > 0:
            out["perf/tokens_per_sec"] = tokens / elapsed
    if summary.data_times:
        out["perf/data_time"] = math.fsum(summary.data_times) / len(summary.data_times)
    return out


def first_nonfinite(values: Iterable[float | None]) -> int | None:
    """Index of the first NaN/Inf in ``values`` (None entries are skipped), or None."""
    for i, v in enumerate(values):
        if v is not None and not math.isfinite(v):
            return i
    return None
