"""NaN and spike forensics: keep what a replay needs, replay the failing step in a scratch
copy, name the module, direction and op, and tell ``data`` from ``state`` from ``transient``.

- :class:`Keeper` (``keeper.py``): the recent batches, RNG states and LRs, and a periodic
  off-device snapshot of the model and optimizer state.
- :func:`replay` (``replay.py``) -> :class:`ReplayResult`: re-runs the steps since the
  snapshot and explains the first bad one (NaN/Inf, or a loss spike).
- ``rng.py`` / ``scratch.py``: random streams saved and restored around a replay; scratch
  copies of the model and optimizer that never touch the live ones.
- ``finding.py``: a live Finding's evidence and recommendation from a replay.
- ``layers.py``: per-layer statistics (attention max logit, output log Z, gradient norm) of
  a spike and the step before it, and which moved first.

The Monitor wires it with ``Monitor(..., forensics=True, loss_fn=...)`` and
``mon.step(loss, batch=batch)``; see docs/monitor.md, "Forensics".
"""

from __future__ import annotations

from tdiag.forensics.keeper import DEFAULT_SNAPSHOT_EVERY, Keeper, Snapshot, StepRecord
from tdiag.forensics.replay import CAUSES, DIRECTIONS, ReplayResult, StepOutcome, loss_of, replay
from tdiag.forensics.rng import RngState, capture_rng, preserved_rng, restore_rng

__all__ = [
    "CAUSES",
    "DEFAULT_SNAPSHOT_EVERY",
    "DIRECTIONS",
    "Keeper",
    "ReplayResult",
    "RngState",
    "Snapshot",
    "StepOutcome",
    "StepRecord",
    "capture_rng",
    "loss_of",
    "preserved_rng",
    "replay",
    "restore_rng",
]
