"""Replay the steps since the last snapshot in a scratch copy, find the first bad step, name
the module, direction and op, and tell data from state from chance.

:func:`replay` never touches the user's model, optimizer or random streams: it deep-copies
the model (without hooks) and the optimizer (:mod:`tdiag.forensics.scratch`), loads the
keeper's snapshot into the copies, and runs every random draw inside
:func:`tdiag.forensics.rng.preserved_rng`. Each replayed step restores the RNG state of
the original step's first forward (same dropout masks) and the LRs its optimizer step
used (same schedule), then does ``zero_grad``, ``loss_fn(model, batch)``, ``backward``,
the clip (when the Monitor knows it), ``optimizer.step()``.

Steps, once a run went bad (NaN/Inf, or a spike for ``kind="spike"``):

1. replay from the snapshot until a step is bad: that is the failing step ``k`` (it can be
   earlier than the step the live run reported, e.g. a backward-only NaN at a step that was
   not a log step, seen live only at the next one); none bad: cause ``transient``;
2. from the state before ``k``, run ``k`` again with the debugger's recorders armed
   (``ActivationRecorder`` / ``GradientRecorder`` with inputs, ``OpTracer``) and name the
   first non-finite module, forward or backward, and the op (:mod:`tdiag.hooks.locate`,
   the same code ``tdiag check`` uses);
3. cause: ``A`` = batch ``k`` on the snapshot's (healthy) state, ``B`` = the batch of the
   step before ``k`` (healthy then) on the state before ``k``. ``data`` when A is bad and B
   is not (the batch alone breaks a healthy model); ``state`` otherwise (A is fine: only
   the updates since made it fail; or B is bad too: the state fails whatever the batch),
   with the weights that grew most since the snapshot as evidence.

For a spike (``kind="spike"``), step 2 also records per-layer statistics (attention max
logit, output log Z, gradient norm: :mod:`tdiag.forensics.layers`) of the step before ``k``
(on its own state, on the way to ``k``) and of ``k``, and names the first that moved
(``evidence["layers"]``): two more forward/backward passes.

The replay costs (steps since the snapshot + 4) forward/backward passes and one more copy of
the model and optimizer state on the device, once per run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdiag.forensics.keeper import Keeper, StepRecord
from tdiag.forensics.layers import compare
from tdiag.forensics.rng import preserved_rng
from tdiag.forensics.runner import Runner, StepOutcome, loss_of, param_abs_max
from tdiag.forensics.scratch import scratch_model, scratch_optimizer, unwrap_model
from tdiag.hooks.locate import first_nonfinite_backward, first_nonfinite_forward, first_nonfinite_op

__all__ = ["CAUSES", "DIRECTIONS", "ReplayResult", "StepOutcome", "loss_of", "replay"]

logger = logging.getLogger(__name__)

#: The causes a replay can name (``None`` when it could not replay).
CAUSES = ("data", "state", "transient")
#: Where the first non-finite value appeared.
DIRECTIONS = ("forward", "backward")
#: Weights listed as having grown most since the snapshot (cause ``state``).
TOP_GROWN = 5

LossFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class ReplayResult:
    """What a replay found.

    Attributes:
        step: the first step the replay found bad (None: none was, or no replay ran).
        module: the first module whose output (forward) or whose backward (backward) went
            non-finite (for a spike: whose activations moved first); None when unknown or
            outside any module (the loss function itself).
        direction: "forward" or "backward"; None when unknown.
        op: the op (``linear``, ``sqrt`` …; backward: with its node, ``sqrt (SqrtBackward0)``)
            where it can be told, else None.
        stats: the statistics that led there: ``input`` / ``output`` of the module (``abs_max``
            = max |x|, ``finite``, ``rms``, ``zero_frac``), ``op_input`` / ``op_output`` of the
            op (backward: ``grad_in`` / ``grad_out``), ``loss``.
        cause: "data", "state", "transient", or None when no replay was possible (``reason``).
        evidence: how the cause was decided (``batch_on_snapshot_bad``,
            ``other_batch_on_prior_state_bad``), ``grown`` (cause state: the weights that grew
            most from the earliest kept snapshot, step ``grown_since_step``, to the state
            before the failing step: ``{name: {"abs_max_then", "abs_max_before", "ratio"}}``),
            ``snapshot_step``, ``replayed_steps``, ``seconds``; for a spike ``moved`` (max
            |output| ratio per module) and ``layers`` (:func:`tdiag.forensics.layers.compare`
            with ``healthy_step``, ``spike_step``, ``healthy_on``).
        kind: "nonfinite" or "spike".
        reason: why there is no answer (no snapshot, batches not kept, loss_fn failed).
    """

    step: int | None
    module: str | None
    direction: str | None
    op: str | None
    stats: dict[str, Any]
    cause: str | None
    evidence: dict[str, Any] = field(default_factory=dict)
    kind: str = "nonfinite"
    reason: str | None = None

    @property
    def reproduced(self) -> bool:
        """The replay found a bad step (cause data or state)."""
        return self.cause in ("data", "state")

    def to_evidence(self) -> dict[str, Any]:
        """The result as a JSON-able dict (for ``Finding.evidence["forensics"]``)."""
        return {
            "kind": self.kind,
            "step": self.step,
            "module": self.module,
            "direction": self.direction,
            "op": self.op,
            "cause": self.cause,
            "stats": self.stats,
            "reason": self.reason,
            **self.evidence,
        }


def _bad_predicate(kind: str, threshold: float | None) -> Callable[[StepOutcome], bool]:
    if kind == "nonfinite":
        return lambda o: not o.finite
    if kind == "spike":
        if threshold is None or not math.isfinite(threshold):
            raise ValueError(f"kind='spike' needs a finite threshold, got {threshold!r}")
        return lambda o: not o.finite or o.loss > threshold
    raise ValueError(f"kind must be 'nonfinite' or 'spike', got {kind!r}")


def _grown(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    rows = []
    for name, a in after.items():
        b = before.get(name)
        if b is None:
            continue
        ratio = a / b if b > 0 else (math.inf if a > 0 else 1.0)
        rows.append((ratio if not math.isnan(ratio) else math.inf, name, b, a))
    rows.sort(key=lambda r: -r[0])
    return {
        name: {"abs_max_then": b, "abs_max_before": a, "ratio": ratio}
        for ratio, name, b, a in rows[:TOP_GROWN]
    }


def _locate(outcome: StepOutcome, rows: dict[str, Any]) -> dict[str, Any]:
    """Module, direction, op and statistics of a non-finite step (``tdiag.hooks.locate``)."""
    origin = first_nonfinite_forward(rows["forward"])
    if origin is not None or not math.isfinite(outcome.loss):
        op = first_nonfinite_op(rows["ops"], "forward")
        stats: dict[str, Any] = {"loss": outcome.loss}
        if origin is not None:
            stats.update(input=origin["in"], output=origin["out"])
        if op is not None:
            stats.update(op_input=op["in"], op_output=op["out"])
        module = origin["name"] if origin is not None else (op["module"] if op else None)
        return {
            "module": module,
            "direction": "forward",
            "op": op["op"] if op else None,
            "stats": stats,
            "module_class": origin["cls_name"] if origin is not None else None,
        }
    back = first_nonfinite_backward(rows["backward"])
    op = first_nonfinite_op(rows["ops"], "backward")
    stats = {"loss": outcome.loss, "grad_norm": outcome.grad_norm}
    if back is None and op is None and rows["largest_grads"]:
        # every gradient entry is finite but their norm overflows float32: name the largest
        largest = rows["largest_grads"]
        top = next(iter(largest))
        return {
            "module": top.rpartition(".")[0] or None,
            "direction": "backward",
            "op": None,
            "stats": {**stats, "largest_grad_norms": largest},
        }
    module = back["culprit"] if back is not None else None
    if op is not None:
        forward_op = rows["ops"]["forward"][op["op_index"]]
        stats.update(
            op_input=forward_op["in"],
            op_output=forward_op["out"],
            grad_in=op["grad_in"],
            grad_out=op["grad_out"],
        )
        module = module or op["module"]
    if back is not None:
        stats.update(
            first_nonfinite_grad=back["name"], last_finite_module=back["last_finite_module"]
        )
    return {
        "module": module,
        "direction": "backward" if (back is not None or op is not None) else None,
        "op": f"{op['op']} ({op['node']})" if op else None,
        "stats": stats,
    }


def _moved_first(rows_bad: list[dict], rows_ok: list[dict]) -> tuple[str | None, dict]:
    """For a spike: per module, max |output| at the bad step over the healthy one; the first
    module in execution order whose ratio is at least 2 (else the largest)."""
    ok = {}
    for r in rows_ok:
        ok.setdefault(r["name"], r["out"]["abs_max"])
    ratios: dict[str, float] = {}
    for r in rows_bad:
        base = ok.get(r["name"])
        if r["name"] in ratios or base is None:
            continue
        ratios[r["name"]] = r["out"]["abs_max"] / base if base > 0 else math.inf
    first = next((n for n, v in ratios.items() if not v < 2.0), None)
    if first is None and ratios:
        first = max(ratios, key=lambda n: ratios[n])
    return first, ratios


def _no_answer(reason: str, kind: str, step: int | None = None) -> ReplayResult:
    return ReplayResult(step, None, None, None, {}, None, {}, kind, reason)


def _consecutive(records: list[StepRecord], after: int) -> bool:
    return all(r.step == after + 1 + i for i, r in enumerate(records))


def replay(
    keeper: Keeper,
    model: nn.Module,
    optimizer: Any,
    loss_fn: LossFn | None,
    *,
    until_step: int,
    kind: str = "nonfinite",
    threshold: float | None = None,
    clip: float | None = None,
    detach: Iterable[Any] = (),
) -> ReplayResult:
    """Replay the steps kept since the last snapshot up to ``until_step`` and explain the
    first bad one.

    Args:
        keeper: the keeper holding the snapshot and the step records.
        model: the live model (only read: deep-copied, never run).
        optimizer: the live optimizer (deep-copied, never stepped), or None (replay without
            updates: only a bad batch can be found then).
        loss_fn: ``loss_fn(model, batch) -> loss`` (Contract 1's contract; a dict with
            ``"loss"`` or an object with ``.loss`` is accepted).
        until_step: the last step to replay (the step the live run reported).
        kind: "nonfinite" (bad = NaN/Inf loss or gradient) or "spike" (bad = that, or a loss
            above ``threshold``).
        threshold: the spike threshold (``kind="spike"`` only).
        clip: the loop's gradient clipping max-norm, applied before each replayed update.
        detach: objects the scratch copy must not copy along (they become None in it).

    Returns:
        A :class:`ReplayResult`; ``cause`` None with a ``reason`` when no replay was possible.
        Never raises for a failure of the user's ``loss_fn``: that is the ``reason``.

    Raises:
        ValueError: an unknown ``kind``, or a spike without a finite ``threshold``.
    """
    is_bad = _bad_predicate(kind, threshold)
    if loss_fn is None:
        return _no_answer("no loss_fn: pass Monitor(..., loss_fn=...) to replay", kind)
    snap = keeper.latest_snapshot()
    if snap is None:
        return _no_answer("no snapshot was taken before the failure", kind)
    records = [r for r in keeper.batches_since(snap.step) if r.step <= until_step]
    if not records or not _consecutive(records, snap.step) or records[-1].step != until_step:
        return _no_answer(
            f"the batches of steps {snap.step + 1}..{until_step} were not all kept "
            "(pass batch= to mon.step() on every step)",
            kind,
        )
    if any(r.batch is None for r in records):
        return _no_answer("a step was recorded without its batch (mon.step(..., batch=))", kind)
    session = _Session(keeper, snap, records, loss_fn, is_bad, kind, clip)
    try:
        with preserved_rng():
            return session.run(model, optimizer, detach)
    except torch.OutOfMemoryError:
        return _no_answer("out of device memory for the replay's scratch copy", kind)
    except Exception as exc:  # the user's loss_fn may raise anything; the run goes on
        logger.debug("tdiag: replay failed", exc_info=exc)
        return _no_answer(f"the replay failed: {type(exc).__name__}: {exc}"[:300], kind)


class _Session:
    """One replay: the scratch copies, the snapshot, the kept steps (see the module doc)."""

    def __init__(
        self,
        keeper: Keeper,
        snap: Any,
        records: list[StepRecord],
        loss_fn: LossFn,
        is_bad: Callable[[StepOutcome], bool],
        kind: str,
        clip: float | None,
    ) -> None:
        self.keeper, self.snap, self.records = keeper, snap, records
        self.loss_fn, self.is_bad, self.kind, self.clip = loss_fn, is_bad, kind, clip
        self.prior = keeper.record_before(snap.step + 1)  # the snapshot step's own batch
        self.t0 = time.perf_counter()
        self.base = {
            "snapshot_step": snap.step,
            "replayed_steps": [records[0].step, records[-1].step],
        }

    def run(self, model: nn.Module, optimizer: Any, detach: Iterable[Any]) -> ReplayResult:
        scratch, memo = scratch_model(unwrap_model(model), detach=detach)
        self.model, self.opt = scratch, scratch_optimizer(optimizer, memo)
        scratch.train()
        self.runner = Runner(scratch, self.opt, self.loss_fn, self.clip)
        self.restore()
        self.at_snapshot = param_abs_max(scratch)
        i_bad, last = self.first_bad()
        if i_bad is None:
            evidence = {**self.base, "seconds": time.perf_counter() - self.t0}
            loss = last.loss if last else None
            return ReplayResult(
                None, None, None, None, {"loss": loss}, "transient", evidence, self.kind
            )
        return self.explain(i_bad)

    def restore(self) -> None:
        self.keeper.restore_into(self.model, self.opt, self.snap)

    def first_bad(self) -> tuple[int | None, StepOutcome | None]:
        """Replay from the snapshot until a step is bad: its index (None: none was)."""
        outcome = None
        for i, rec in enumerate(self.records):
            outcome = self.runner.step(rec, update=True)
            if self.is_bad(outcome):
                return i, outcome
        return None, outcome

    def grown(self) -> tuple[int, dict[str, dict[str, float]]]:
        """Weights that grew most from the earliest kept snapshot (the latest may be one step
        before the failure, when it says nothing about growth) to the current state."""
        baseline = self.keeper.weight_abs_max()
        since, base_max = baseline if baseline is not None else (self.snap.step, self.at_snapshot)
        return since, _grown(base_max, param_abs_max(self.model))

    def layer_stats(self, rec: StepRecord | None) -> dict[str, Any] | None:
        """Per-layer statistics of ``rec`` on the current state (None: none, or they failed:
        the rest of the replay goes on without them)."""
        if rec is None:
            return None
        try:
            return {"step": rec.step, **self.runner.layer_stats(rec)}
        except Exception as exc:  # a model the probes cannot follow: no table
            logger.debug("tdiag: per-layer statistics failed", exc_info=exc)
            return None

    def compare_layers(
        self, healthy: dict[str, Any] | None, failing: StepRecord
    ) -> dict[str, Any] | None:
        """Which layer's statistics moved first at the spike (:mod:`tdiag.forensics.layers`).
        The healthy side is the step before the spike on its own state; when the spike is the
        first replayed step, the snapshot step's batch on the same state as the spike's."""
        same_state = healthy is None
        if same_state:
            healthy = self.layer_stats(self.prior)
        bad = self.layer_stats(failing)
        if healthy is None or bad is None:
            return None
        return {
            "healthy_step": healthy["step"],
            "spike_step": bad["step"],
            "healthy_on": "the spike's state" if same_state else "its own state",
            **compare(healthy, bad),
        }

    def explain(self, i_bad: int) -> ReplayResult:
        failing = self.records[i_bad]
        # the state before the failing step, again (the first pass left its update in); for a
        # spike, the step before it is recorded on its own state on the way (as the run had it)
        self.restore()
        healthy = None
        for j, rec in enumerate(self.records[:i_bad]):
            if self.kind == "spike" and j == i_bad - 1:
                healthy = self.layer_stats(rec)
            self.runner.step(rec, update=True)
        layers = None
        if self.kind == "spike":
            layers = self.compare_layers(healthy, failing)
        since, grown = self.grown()
        other = self.records[i_bad - 1] if i_bad > 0 else self.prior
        other_out, other_rows = self.runner.recorded(other) if other is not None else (None, None)
        bad_out, rows = self.runner.recorded(failing)
        if self.kind == "spike":
            ok_rows = other_rows["forward"] if other_rows else []
            module, moved = _moved_first(rows["forward"], ok_rows)
            where = {"module": module, "direction": "forward", "op": None}
            where["stats"] = {"loss": bad_out.loss}
            extra: dict[str, Any] = {"moved": moved, "layers": layers}
        else:
            where = _locate(bad_out, rows)
            extra = {"module_class": where.pop("module_class", None)}
        # cause: the failing batch on the snapshot's state (A), another on the prior state (B)
        other_bad = bool(other_out is not None and self.is_bad(other_out))
        self.restore()
        a_bad = self.is_bad(self.runner.probe(failing))
        cause = "data" if a_bad and not other_bad else "state"
        evidence = {
            **self.base,
            "batch_on_snapshot_bad": a_bad,
            "other_batch_on_prior_state_bad": other_bad if other is not None else None,
            "other_step": other.step if other is not None else None,
            **{k: v for k, v in extra.items() if v is not None},
        }
        if cause == "state":
            evidence.update(grown=grown, grown_since_step=since)
        evidence["seconds"] = time.perf_counter() - self.t0
        return ReplayResult(
            failing.step,
            where["module"],
            where["direction"],
            where["op"],
            where["stats"],
            cause,
            evidence,
            self.kind,
        )
