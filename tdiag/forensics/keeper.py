"""The keeper: what a replay needs, kept cheaply while the run is healthy.

With ``Monitor(..., forensics=True)`` the Monitor feeds a :class:`Keeper`:

- every step, :meth:`Keeper.record` keeps the step's batch, the torch RNG states at its
  first forward (:meth:`Keeper.observe_forward`, so dropout masks replay exactly; a forward
  drawing from numpy or ``random`` replays with other draws) and the LRs its
  optimizer step used (:meth:`Keeper.observe_optimizer_step`, so a scheduler replays too);
- every ``snapshot_every`` steps (at the first healthy log step at or past the cadence),
  :meth:`Keeper.maybe_snapshot` copies the model's ``state_dict`` and the optimizer's state
  off the device: ``copy_(..., non_blocking=True)`` into pinned CPU buffers allocated once
  and reused (CUDA; stream order makes the copy see the values before the next update),
  a plain ``copy_`` on CPU. The batches of steps up to the snapshot are dropped then.

Batches. Token ids and masks are small (``B x L`` int64: 256 KiB at 32 x 1024), so the keeper
takes a *copy* of every tensor in the batch (``detach().clone()``, on the batch's device, no
host sync): loops that reuse their input buffers (pinned staging buffers filled with
``copy_``, ``torch.compile`` static inputs, HF's collators writing in place) would otherwise
leave the keeper holding the next batch. Pass ``copy_batches=False`` for a loop known to
hand fresh tensors every step: the keeper then keeps references (no device op at all).

Memory: one copy of the model's state and of the optimizer's state in CPU memory (Adam:
about 3x the parameters' bytes; see :meth:`Keeper.memory_bytes`), plus at most
``snapshot_every + log_every`` batches on the device.

The keeper only reads the live model and optimizer; nothing here changes them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdiag.forensics.rng import RngState, capture_rng

__all__ = ["DEFAULT_SNAPSHOT_EVERY", "Keeper", "Snapshot", "StepRecord"]

logger = logging.getLogger(__name__)

#: Steps between snapshots by default. One snapshot copies the model and optimizer state to
#: the host (bench/bench_forensics.py measures it); every 50 steps keeps the cost on a healthy
#: run under 1 % (docs/performance.md, "Forensics") and a replay re-runs at most 50 + log_every
#: steps.
DEFAULT_SNAPSHOT_EVERY = 50


@dataclass(frozen=True)
class Snapshot:
    """Model and optimizer state after one step's update, off the device.

    Attributes:
        step: the step whose update the state includes (0: before the first step).
        model_state: the model's ``state_dict()`` with every tensor copied to CPU.
        optim_state: the optimizer's ``state_dict()`` with every tensor copied to CPU
            (None: no optimizer).
        rng: the random streams when the snapshot was taken.
    """

    step: int
    model_state: dict[str, Any]
    optim_state: dict[str, Any] | None
    rng: RngState


@dataclass(frozen=True)
class StepRecord:
    """One step as the keeper saw it.

    Attributes:
        step: the step (1-based, the Monitor's count).
        batch: what the loop passed as ``mon.step(loss, batch=...)`` (tensors copied unless
            ``copy_batches=False``).
        rng: the random streams at the step's first forward (None: no forward was seen).
        lrs: the learning rate of each param group that step's ``optimizer.step()`` used
            (None: no optimizer step was seen).
    """

    step: int
    batch: Any
    rng: RngState | None = None
    lrs: list[float] | None = field(default=None)


def _copy_batch(batch: Any) -> Any:
    """``batch`` with every tensor detached and cloned (same device, no host sync)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, Mapping):
        try:
            return type(batch)({k: _copy_batch(v) for k, v in batch.items()})
        except TypeError:  # a Mapping type that does not take a dict (BatchEncoding does)
            return {k: _copy_batch(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_copy_batch(v) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_copy_batch(v) for v in batch)
    return batch


class _HostBuffers:
    """Pinned (CUDA) / plain (CPU) host tensors, allocated once per source tensor shape and
    refilled by ``copy_`` at each snapshot."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self.pending: torch.cuda.Event | None = None

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.is_cuda and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._bufs[key] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _copy_tree(obj: Any, bufs: _HostBuffers, key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return bufs.copy(key, obj)
    if isinstance(obj, Mapping):
        return {k: _copy_tree(v, bufs, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy_tree(v, bufs, f"{key}/{i}") for i, v in enumerate(obj))
    return copy.deepcopy(obj)


class Keeper:
    """Keep the recent batches and a periodic off-device snapshot, for :func:`replay`.

    Args:
        snapshot_every: steps between snapshots (>= 1); the Monitor snapshots at the first
            healthy log step at or past it, so the effective cadence is rounded up to a log
            step.
        copy_batches: copy the batch's tensors (default; see the module docstring) or keep
            references.
        max_records: the most step records kept (oldest dropped first; default
            ``4 * snapshot_every``): a bound on memory if snapshots stop being taken.

    Raises:
        ValueError: ``snapshot_every`` or ``max_records`` < 1.
    """

    def __init__(
        self,
        *,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        copy_batches: bool = True,
        max_records: int | None = None,
    ) -> None:
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
        if max_records is None:
            max_records = 4 * snapshot_every
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records!r}")
        self.snapshot_every = snapshot_every
        self.copy_batches = copy_batches
        self._records: deque[StepRecord] = deque(maxlen=max_records)
        self._snapshot: Snapshot | None = None
        self._bufs = _HostBuffers()
        self._forward_rng: RngState | None = None
        self._step_lrs: list[float] | None = None
        self.enabled = True
        self.snapshots_taken = 0
        # (step, names, per-parameter max |w| on the device) at each snapshot: the replay's
        # baseline for "which weights grew" (a few floats each, no host sync to take)
        self._abs_max: deque[tuple[int, list[str], torch.Tensor]] = deque(maxlen=8)

    # -- per step --------------------------------------------------------------------------
    def observe_forward(self) -> None:
        """Call at a model forward: the first one since the last :meth:`record` keeps the
        RNG state (so a replay draws the same dropout masks)."""
        if self._forward_rng is None:
            # torch's streams only (~1 us): what dropout and torch.rand* in a forward draw
            # from; numpy's and Python's (~100 us together) are saved once around the replay
            self._forward_rng = capture_rng(numpy=False, python=False)

    def observe_optimizer_step(self, optimizer: Any) -> None:
        """Call from an ``optimizer.step`` pre-hook: keeps the LRs the step uses (read as
        Python floats; a tensor LR is kept as a tensor, read only by a replay)."""
        self._step_lrs = [g.get("lr") for g in getattr(optimizer, "param_groups", [])]

    def record(self, step: int, batch: Any) -> None:
        """Keep step ``step``'s batch (with the RNG state and LRs observed since the last
        call). No host sync."""
        if not self.enabled:
            return
        kept = _copy_batch(batch) if self.copy_batches else batch
        self._records.append(StepRecord(step, kept, self._forward_rng, self._step_lrs))
        self._forward_rng = None
        self._step_lrs = None

    def due(self, step: int) -> bool:
        """Is a snapshot due at ``step`` (none yet, or ``snapshot_every`` steps since)?"""
        return self._snapshot is None or step - self._snapshot.step >= self.snapshot_every

    def maybe_snapshot(
        self, step: int, model: nn.Module, optimizer: Any = None, *, force: bool = False
    ) -> bool:
        """Snapshot the state after step ``step``'s update when due (or ``force``).

        Call only when the state is known healthy (the Monitor calls it after a log step
        found no non-finite value). Drops the records of steps before ``step``.

        Returns:
            True when a snapshot was taken.
        """
        if not self.enabled or not (force or self.due(step)):
            return False
        with torch.no_grad():
            model_state = _copy_tree(model.state_dict(), self._bufs, "model")
            optim_state = None
            if optimizer is not None and hasattr(optimizer, "state_dict"):
                optim_state = _copy_tree(optimizer.state_dict(), self._bufs, "optim")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()  # the copies are done once this event is
            self._bufs.pending = event
        with torch.no_grad():
            named = [(n, p.detach()) for n, p in model.named_parameters() if p.numel() > 0]
            if named:
                maxes = torch._foreach_norm([p for _, p in named], float("inf"))
                dev = maxes[0].device
                self._abs_max.append(
                    (step, [n for n, _ in named], torch.stack([m.float().to(dev) for m in maxes]))
                )
        self._snapshot = Snapshot(step, model_state, optim_state, capture_rng())
        # the snapshot step's own record stays: a healthy batch on a nearby state, which the
        # replay uses to tell a bad batch from a bad state (replay.py, cause)
        while self._records and self._records[0].step < step:
            self._records.popleft()
        self.snapshots_taken += 1
        return True

    # -- for the replay --------------------------------------------------------------------
    def latest_snapshot(self) -> Snapshot | None:
        """The last snapshot (waits for its asynchronous copy to finish), or None."""
        if self._bufs.pending is not None:
            self._bufs.pending.synchronize()
            self._bufs.pending = None
        return self._snapshot

    def batches_since(self, step: int) -> list[StepRecord]:
        """The kept records of the steps after ``step``, oldest first."""
        return [r for r in self._records if r.step > step]

    def weight_abs_max(self) -> tuple[int, dict[str, float]] | None:
        """The earliest kept snapshot's per-parameter max |w| (one host sync), with its step;
        None before any snapshot."""
        if not self._abs_max:
            return None
        step, names, values = self._abs_max[0]
        return step, dict(zip(names, values.tolist(), strict=True))  # host sync

    def record_before(self, step: int) -> StepRecord | None:
        """The kept record of step ``step - 1``, or None."""
        return next((r for r in self._records if r.step == step - 1), None)

    def restore_into(
        self, model: nn.Module, optimizer: Any = None, snapshot: Snapshot | None = None
    ) -> Snapshot:
        """Load ``snapshot`` (default: the latest) into ``model`` and ``optimizer``.

        Meant for the replay's scratch copies (:func:`tdiag.forensics.scratch.scratch_copy`),
        never the live ones: their state would be overwritten.

        Raises:
            LookupError: no snapshot was taken.
        """
        snap = snapshot if snapshot is not None else self.latest_snapshot()
        if snap is None:
            raise LookupError("no snapshot: the keeper has not snapshotted the model yet")
        with torch.no_grad():
            model.load_state_dict(snap.model_state)
        if optimizer is not None and snap.optim_state is not None:
            # load_state_dict casts the state to each parameter's device and dtype, and copies
            optimizer.load_state_dict(copy.deepcopy(snap.optim_state))
        return snap

    def memory_bytes(self) -> dict[str, int]:
        """``{"snapshot": host bytes of the snapshot buffers, "batches": bytes of the kept
        batches' tensors}``."""
        batches = 0
        for r in self._records:
            for t in _tensors(r.batch):
                batches += t.numel() * t.element_size()
        return {"snapshot": self._bufs.nbytes(), "batches": batches}

    def rebase(self, step: int) -> None:
        """The live model and optimizer were reset to the latest snapshot (a guard's
        rollback) and training goes on from step ``step + 1``: the records since the
        snapshot no longer lead to the live state, so they are dropped, and the snapshot
        now stands for the state after step ``step``.

        Raises:
            LookupError: no snapshot was taken.
        """
        if self._snapshot is None:
            raise LookupError("no snapshot to rebase: the keeper has not snapshotted yet")
        self._records.clear()
        self._snapshot = dataclasses.replace(self._snapshot, step=step)
        self._forward_rng = None
        self._step_lrs = None

    def forget_through(self, step: int) -> None:
        """Drop the records of steps up to ``step`` (the guard discarded their updates)."""
        while self._records and self._records[0].step <= step:
            self._records.popleft()

    def clear(self) -> None:
        """Forget the records and the snapshot (keep the host buffers for reuse)."""
        self._records.clear()
        self._snapshot = None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []
