"""Telling optimizer steps from ``mon.step()`` calls: ``step()`` called once per micro-batch.

The Monitor counts ``optimizer.step()`` calls with a post-hook. A ``step()`` with no
optimizer step since the previous one is either a step the optimizer skipped (a
``GradScaler`` that found inf/NaN gradients; a loop that skips an update) or a micro-batch
of gradient accumulation: the loop calls ``mon.step()`` inside its accumulation loop. The
two look alike one call at a time; the pattern tells them apart. Micro-batches repeat with
a fixed period k from the first step on (k-1 calls without a step, then one with); a
scaler skips the first few steps at most, then steps on every call.

So, at the start of a run, while no ``step()`` has yet had an optimizer step behind it,
the Monitor *defers* its first log row (the calls are recorded but not yet written) until
the pattern is clear: two cycles of the same length k >= 2 mean micro-batches (the calls
are re-counted as optimizer steps, one warning says what to do); anything else means
real steps, skipped or not, and the deferred rows are written as they are. A run whose
first ``step()`` follows an optimizer step — every correct loop — is decided at once and
defers nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["PROBATION_CALLS", "StepCadence", "merge_calls", "micro_batch_warning"]

PROBATION_CALLS = 64
"""At most this many calls are deferred while the pattern is unclear."""


class StepCadence:
    """The decision, one ``step()`` call at a time.

    :meth:`observe` returns what the Monitor does with the call:

    - ``"record"``: an ordinary step;
    - ``"defer"``: record it, but write no log row yet (the pattern is still open);
    - ``"flush"``: decided: the calls are real steps; record it and write the deferred row;
    - ``"regroup"``: decided: micro-batches of period :attr:`period`; re-count the deferred
      calls as the optimizer steps :attr:`groups` and write the row (with
      :attr:`placement` ``"before"`` this call opens the next step instead);
    - ``"fold"``: a micro-batch (after the decision): keep it for the optimizer step;
    - ``"close"``: the micro-batch that ends an optimizer step (``mon.step()`` after
      ``optimizer.step()``): record the step with it;
    - ``"close_prev"``: the first micro-batch after an optimizer step (``mon.step()`` before
      ``optimizer.step()`` in the accumulation loop): record the kept calls as that step,
      keep this one for the next.

    Micro-batches are recognised from the first two optimizer steps: they come at calls
    ``s1`` and ``s2 = s1 + k`` with ``k >= 2`` and ``s1 == k`` (``mon.step()`` after the
    optimizer step) or ``s1 == k + 1`` (before it).
    """

    def __init__(self) -> None:
        self.mode = "probation"  # then "per-call" or "micro"
        self.period: int | None = None
        self.placement: str | None = None  # "after" | "before" optimizer.step()
        self.groups: list[int] = []
        self._calls = 0
        self._stepped_at: list[int] = []

    def observe(self, stepped: bool | None) -> str:
        """``stepped``: an optimizer step ran since the previous call (None: unknown)."""
        if self.mode == "per-call":
            return "record"
        if self.mode == "micro":
            if self.placement == "before":
                return "close_prev" if stepped else "fold"
            return "close" if stepped else "fold"
        self._calls += 1
        if stepped is None:
            return self._decide_per_call()
        if stepped:
            self._stepped_at.append(self._calls)
            if self._stepped_at == [1]:
                return self._decide_per_call()
            if len(self._stepped_at) == 2:
                s1, s2 = self._stepped_at
                k = s2 - s1
                if k >= 2 and s1 in (k, k + 1):
                    self.mode, self.period = "micro", k
                    self.placement = "after" if s1 == k else "before"
                    self.groups = [k, k]
                    return "regroup"
                return self._decide_per_call()
            return "defer"
        if self._calls >= PROBATION_CALLS:
            return self._decide_per_call()
        return "defer"

    def reject(self) -> str:
        """Undo a ``"regroup"`` decision (the calls were skipped steps after all)."""
        self.mode, self.period, self.placement = "probation", None, None
        return self._decide_per_call()

    def _decide_per_call(self) -> str:
        deferred = self._calls > 1
        self.mode = "per-call"
        self.groups = []
        return "flush" if deferred else "record"

    def state_dict(self) -> dict:
        return {"mode": self.mode, "period": self.period, "placement": self.placement}

    def load_state_dict(self, state: dict) -> None:
        mode = state.get("mode", "per-call")
        # A resumed run restarts mid-stream: no deferral, but keep a known micro period.
        self.mode = "micro" if mode == "micro" else "per-call"
        self.period = state.get("period")
        self.placement = state.get("placement")


def merge_calls(calls: list[tuple]) -> tuple[Any, Any, float | None, float]:
    """One optimizer step from its micro-batch calls ``(loss, tokens, data_time, step_time)``:
    the mean loss (on the device, no host sync), summed tokens, data and step times."""
    losses = [c[0] for c in calls if c[0] is not None]
    loss: Any = None
    tensors = [v.detach().float().mean() for v in losses if isinstance(v, torch.Tensor)]
    if tensors and len(tensors) == len(losses):
        dev = tensors[0].device
        loss = torch.stack([t.to(dev) for t in tensors]).mean()
    elif losses:
        loss = math.fsum(float(v) for v in losses) / len(losses)
    toks = [c[1] for c in calls if c[1] is not None]
    tokens: Any = None
    if any(isinstance(t, torch.Tensor) for t in toks):
        tokens = sum(t.detach().sum() if isinstance(t, torch.Tensor) else t for t in toks)
    elif toks:
        tokens = sum(int(t) for t in toks)
    dts = [c[2] for c in calls if c[2] is not None]
    return loss, tokens, (math.fsum(dts) if dts else None), math.fsum(c[3] for c in calls)


def micro_batch_warning(k: int | None) -> str:
    """The one warning of a loop that calls ``mon.step()`` k times per optimizer step."""
    return (
        f"tdiag: mon.step() is called {k} times per optimizer step (once per micro-batch of "
        "gradient accumulation?). Call it once per optimizer step, after optimizer.step(), "
        "with that step's loss (the mean over its micro-batches, not divided by the "
        f"accumulation steps) and its tokens. tdiag now counts every {k} calls as one step "
        "(their mean loss, their summed tokens)."
    )
