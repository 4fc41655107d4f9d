"""The Monitor's side of forensics: feed the keeper during the run, replay once when the
run first goes non-finite, and put the answer into the live Findings.

The Monitor (``Monitor(..., forensics=True, loss_fn=...)``) calls, in this order:
``on_forward`` from its root forward pre-hook (training forwards only), ``on_step`` from
``step()`` with the step's batch, ``after_log`` once a log step found the run healthy
(a snapshot when due), ``explain`` with the non-finite Findings of a log step (or of the
guard, or of the check at close), and ``recovered`` after the guard skipped or rolled back
a non-finite step (the keeper goes on: a later episode is replayed too). Nothing
here raises into the training loop (a failure is logged once; forensics turn themselves
off) and nothing changes the live model, optimizer or random streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from tdiag.findings import Finding
from tdiag.forensics.finding import with_forensics
from tdiag.forensics.keeper import DEFAULT_SNAPSHOT_EVERY, Keeper
from tdiag.forensics.replay import ReplayResult, replay

__all__ = ["LiveForensics"]

logger = logging.getLogger(__name__)

#: Non-finite episodes replayed per run, when the guard keeps the run going (skip/rollback)
#: after each: a replay costs the steps since the snapshot + 4 forward/backward passes.
MAX_NONFINITE_REPLAYS = 3


class LiveForensics:
    """Keeper + one replay per run, for the Monitor.

    Args:
        model: the live model. optimizer: the live optimizer (or None).
        loss_fn: ``loss_fn(model, batch) -> loss``; None: batches are not kept (nothing to
            replay with) and Findings say so.
        snapshot_every: steps between snapshots (:class:`Keeper`).
        copy_batches: copy the batches' tensors (default) or keep references.
        clip: the loop's clipping max-norm, replayed before each update.

    Attributes:
        detach: objects the replay's scratch copy must not copy (set by adapters: the
            Lightning trainer).
        result: the latest replay's :class:`ReplayResult`, once one ran.
        results: every replay's ``(step it replayed up to, ReplayResult)``, in run order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        loss_fn: Callable[[nn.Module, Any], Any] | None,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        copy_batches: bool = True,
        clip: float | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.clip = model, optimizer, loss_fn, clip
        self.keeper = Keeper(snapshot_every=snapshot_every, copy_batches=copy_batches)
        self.keeper.enabled = loss_fn is not None
        self.detach: Sequence[Any] = ()
        self.result: ReplayResult | None = None
        self.results: list[tuple[int, ReplayResult]] = []  # (replayed up to step, answer)
        self.replays = 0
        self._failed = False
        self._hook = None
        if self.keeper.enabled and hasattr(optimizer, "register_step_pre_hook"):
            self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self._guard(lambda: self.keeper.maybe_snapshot(0, model, optimizer, force=True))

    # -- guarded calls ---------------------------------------------------------------------
    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self._failed:
            return None
        try:
            return fn()
        except Exception as exc:  # forensics never stop a training run
            self._failed = True
            self.keeper.enabled = False
            logger.warning("tdiag: forensics turned off (%s: %s)", type(exc).__name__, exc)
            return None

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.keeper.enabled:
            self.keeper.observe_optimizer_step(optimizer)

    # -- the Monitor's calls ---------------------------------------------------------------
    def on_forward(self, module: nn.Module) -> None:
        """A forward of the live model began (keeps the RNG state of the step's first)."""
        if self.keeper.enabled and module.training:
            self._guard(self.keeper.observe_forward)

    def on_step(self, step: int, batch: Any) -> None:
        """``mon.step(..., batch=batch)`` recorded step ``step``."""
        if self.keeper.enabled:
            self._guard(lambda: self.keeper.record(step, batch))

    def after_log(self, step: int) -> None:
        """A log step found nothing non-finite up to ``step``: snapshot when due."""
        if self.keeper.enabled:
            self._guard(lambda: self.keeper.maybe_snapshot(step, self.model, self.optimizer))

    def explain(
        self, findings: Iterable[Finding], step: int, *, recovering: bool = False
    ) -> list[Finding]:
        """Replay up to ``step`` and add the answer to ``findings``.

        One replay per episode: Findings of an episode already replayed (their ``step`` is at
        or before the step a replay ran to) get that replay's answer. ``recovering``: the
        guard restores a healthy live state (``on_nonfinite="skip"`` or ``"rollback"``), so
        the keeper goes on keeping (:meth:`recovered` re-bases it) and a later episode is
        replayed too (at most :data:`MAX_NONFINITE_REPLAYS` per run); otherwise the live
        state is poisoned from here and the keeper stops (every later Finding gets this
        answer)."""
        findings = list(findings)
        if not findings:
            return findings
        episode = min((int(f.step) for f in findings if f.step is not None), default=step)
        result = self._result_for(episode)
        if result is None and self.keeper.enabled and self.replays < MAX_NONFINITE_REPLAYS:
            result = self._guard(self._replay_until(step))
            if result is not None:
                self.result = result
                self.results.append((step, result))
        elif result is None:
            result = self.result
        if not recovering:
            self.poisoned()
        if result is None:
            return findings
        return [with_forensics(f, result) for f in findings]

    def _result_for(self, episode: int) -> ReplayResult | None:
        """The answer of the replay that covered step ``episode`` (None: none did)."""
        start = 0
        for until, result in self.results:
            if start < episode <= until:
                return result
            start = until
        return None

    def poisoned(self) -> None:
        """The live state is non-finite from here (nothing restored it): stop keeping."""
        if self.keeper.enabled:
            self.keeper.enabled = False
            self.keeper.clear()
            self.close()

    def recovered(self, step: int) -> None:
        """The guard skipped step ``step``'s update or rolled the live state back: the live
        state is healthy and stands for "after step ``step``". Snapshot it as such (unless the
        guard's rollback just did) and drop the records up to ``step``, whose batches the live
        run did not train on (a later replay must not re-run them)."""

        def rebase() -> None:
            snap = self.keeper.latest_snapshot()
            if snap is None or snap.step != step:
                self.keeper.maybe_snapshot(step, self.model, self.optimizer, force=True)
            self.keeper.forget_through(step)

        if self.keeper.enabled:
            self._guard(rebase)

    def _replay_until(self, step: int) -> Callable[[], ReplayResult]:
        def run() -> ReplayResult:
            self.replays += 1
            result = replay(
                self.keeper,
                self.model,
                self.optimizer,
                self.loss_fn,
                until_step=step,
                clip=self.clip,
                detach=self.detach,
            )
            logger.info("tdiag: forensics replay: %s", result.to_evidence())
            return result

        return run

    def close(self) -> None:
        """Remove the optimizer hook (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
