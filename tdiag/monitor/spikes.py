"""Live loss-spike detection on the per-step losses (``train.loss-spikes``, raised live).

The per-step losses of an interval stay on the device until the log step (the interval
accumulator keeps a detached reference to each, metrics.py) and come to the host with the
log step's one transfer; this module judges them there, on the host, so detection costs no
device work and no extra sync. It looks at every step, not at the interval mean: a two-step
spike vanishes in a 10-step average.

Rule (the same shape as the report's, :func:`tdiag.report.analyses.spikes`, tuned for the
noisier per-step values): step t's loss ``x_t`` is a spike when, against the ``window``
finite per-step losses before it,

    x_t - median > z · σ    and    x_t - median > rel · |median|,

with the robust noise scale ``σ = 1.4826 · median(|Δx|) / √2`` of the same window (first
differences cancel a falling trend, the median ignores the spike's own two jumps). Nothing is
judged before ``min_history`` finite losses. Consecutive spike steps make one episode (one
Finding). The defaults, and the false-alarm rate they give on healthy runs, are in
docs/checks.md ("``train.loss-spikes`` (live)") and ``bench/bench_spikes.py``.

Metric key produced here: ``train/loss_max`` (max of the interval's per-step losses; NaN wins).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tdiag.findings import Finding, Severity

__all__ = [
    "SPIKE_MIN_HISTORY",
    "SPIKE_REL",
    "SPIKE_WINDOW",
    "SPIKE_Z",
    "Spike",
    "SpikeDetector",
    "loss_max",
    "spike_finding",
    "spike_forensics",
]

# Defaults (Monitor options spike_window / spike_z / spike_rel). Judgement, then measured:
# bench/bench_spikes.py runs healthy reference-model runs of 3 sizes x 3 seeds and counts the
# steps flagged (docs/checks.md states the rate). A window of 50 steps follows the loss's
# trend within a few hundred steps yet holds enough differences for a stable median; z = 6
# and 25 % (the report rule's values) keep per-step batch noise out.
SPIKE_WINDOW = 50
SPIKE_Z = 6.0
SPIKE_REL = 0.25
SPIKE_MIN_HISTORY = 20
MAD_TO_SIGMA = 1.4826  # median(|x - med|) of a normal distribution is 0.6745 sigma
# Live Findings raised at most this many times per run (every spike stays in the detector's
# count and in the report); later episodes are counted, not sent to the console.
MAX_LIVE_SPIKES = 20
# With forensics on, the first this many episodes are replayed (each: the steps since the
# snapshot + 4 forward/backward passes in a scratch copy, once).
MAX_SPIKE_REPLAYS = 3
# Modules listed in the evidence as having moved most at the spike (max |output| ratio).
TOP_MOVED = 8
# An episode whose peak doubles the baseline, or the second episode of a run, is a warning
# (as the report rule: SPIKE_WARN_RATIO / SPIKE_WARN_COUNT); a single moderate one is info.
WARN_RATIO = 2.0
WARN_COUNT = 2


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


@dataclass
class Spike:
    """One episode of consecutive spike steps."""

    steps: list[int]
    """The spike steps (consecutive)."""
    peak_step: int
    peak_value: float
    baseline: float
    """Median of the trailing window at the first spike step."""
    sigma: float
    robust_z: float
    """(peak − baseline) / σ."""
    ratio: float | None
    """peak / baseline (None for a zero baseline)."""
    action: str | None = None
    """What the guard did about it (``on_spike``), if anything."""
    forensics: dict[str, Any] = field(default_factory=dict)
    """What the replay found (cause, layer statistics), when forensics is on."""

    @property
    def first_step(self) -> int:
        return self.steps[0]

    def to_evidence(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "first_step": self.steps[0],
            "peak_step": self.peak_step,
            "peak_value": self.peak_value,
            "baseline": self.baseline,
            "sigma": self.sigma,
            "robust_z": self.robust_z,
            "ratio": self.ratio,
        }


class SpikeDetector:
    """Judge per-step losses, in step order, against a trailing window (see module docstring).

    Args:
        window: trailing finite losses the median and σ are taken over (>= 4).
        z: robust sigmas above the median (> 0).
        rel: relative floor: the excess must also exceed ``rel · |median|`` (>= 0).
        min_history: finite losses seen before anything is judged (2 .. window).

    Raises:
        ValueError: a parameter out of range, naming it.
    """

    def __init__(
        self,
        *,
        window: int = SPIKE_WINDOW,
        z: float = SPIKE_Z,
        rel: float = SPIKE_REL,
        min_history: int = SPIKE_MIN_HISTORY,
    ) -> None:
        if not isinstance(window, int) or window < 4:
            raise ValueError(f"spike_window must be an int >= 4, got {window!r}")
        if not (isinstance(z, int | float) and z > 0):
            raise ValueError(f"spike_z must be > 0, got {z!r}")
        if not (isinstance(rel, int | float) and rel >= 0):
            raise ValueError(f"spike_rel must be >= 0, got {rel!r}")
        min_history = min(min_history, window)
        if min_history < 2:
            raise ValueError(f"min_history must be >= 2, got {min_history!r}")
        self.window, self.z, self.rel, self.min_history = window, float(z), float(rel), min_history
        self._hist: deque[float] = deque(maxlen=window)
        self._open: Spike | None = None
        self._last_step: int | None = None
        self.episodes = 0
        """Spike episodes found so far in the run."""
        self.steps_judged = 0
        """Steps judged so far (finite losses with a full enough history)."""

    def threshold(self) -> tuple[float, float] | None:
        """(baseline, σ) of the current window, or None before ``min_history`` losses."""
        if len(self._hist) < self.min_history:
            return None
        hist = list(self._hist)
        base = _median(hist)
        diffs = [abs(b - a) for a, b in itertools.pairwise(hist)]
        sigma = MAD_TO_SIGMA * _median(diffs) / math.sqrt(2.0)
        # A perfectly flat stretch has zero differences: a tiny floor keeps z finite.
        return base, max(sigma, 1e-12 + 1e-9 * abs(base))

    def observe(self, first_step: int, losses: Sequence[float | None]) -> list[Spike]:
        """Judge the losses of steps ``first_step, first_step + 1, …``; return the episodes
        that *start* in them (an episode still open at the end goes on into the next call).
        None or non-finite losses are skipped and end an open episode (NaN/Inf is
        ``train.nonfinite-loss``'s, not a spike)."""
        new: list[Spike] = []
        for i, x in enumerate(losses):
            step = first_step + i
            if x is None or not math.isfinite(x):
                self._open = None
                continue
            judged = self.threshold()
            if judged is not None:
                self.steps_judged += 1
                base, sigma = judged
                excess = x - base
                if excess > self.z * sigma and excess > self.rel * abs(base):
                    self._extend(step, x, base, sigma, new)
                else:
                    self._open = None
            self._hist.append(float(x))
            self._last_step = step
        return new

    def _extend(self, step: int, x: float, base: float, sigma: float, new: list[Spike]) -> None:
        ep = self._open
        if ep is not None and ep.steps[-1] == step - 1:
            ep.steps.append(step)
            if x > ep.peak_value:
                ep.peak_step, ep.peak_value = step, x
                ep.robust_z = (x - ep.baseline) / ep.sigma
                ep.ratio = x / ep.baseline if ep.baseline else None
            return
        ep = Spike(
            steps=[step],
            peak_step=step,
            peak_value=x,
            baseline=base,
            sigma=sigma,
            robust_z=(x - base) / sigma,
            ratio=x / base if base else None,
        )
        self._open = ep
        self.episodes += 1
        new.append(ep)

    def state_dict(self) -> dict[str, Any]:
        """The trailing window and counters (saved with ``Monitor.state_dict``)."""
        return {
            "history": list(self._hist),
            "episodes": self.episodes,
            "steps_judged": self.steps_judged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hist = [float(v) for v in state.get("history", []) if math.isfinite(float(v))]
        self._hist = deque(hist[-self.window :], maxlen=self.window)
        self.episodes = int(state.get("episodes", 0))
        self.steps_judged = int(state.get("steps_judged", 0))
        self._open = None


def loss_max(losses: Sequence[float | None]) -> float | None:
    """Max of the finite-or-not per-step losses (NaN wins, as ``train/grad_norm_max``)."""
    vals = [v for v in losses if v is not None]
    if not vals:
        return None
    return max(vals, key=lambda v: math.inf if v != v else v)


def spike_forensics(result: Any) -> dict[str, Any]:
    """The replay's answer (:class:`tdiag.forensics.ReplayResult`, ``kind="spike"``) for the
    spike's evidence: cause; ``moved_first``, the first layer and statistic (attention max
    logit, output log Z, gradient norm) that moved by ``layers.factor`` against the step
    before (:mod:`tdiag.forensics.layers`), with ``layers.table`` of the ratios; and, from
    the activations, ``output_moved_first`` (the first module whose max |output| is >= 2x the
    step before's) and ``moved_most`` (the modules whose max |output| moved most)."""
    ev = result.to_evidence()
    moved = ev.pop("moved", None) or {}
    finite = {k: v for k, v in moved.items() if isinstance(v, int | float)}
    top = sorted(finite, key=lambda k: -finite[k] if finite[k] == finite[k] else 0.0)
    ev["moved_most"] = {k: finite[k] for k in top[:TOP_MOVED]}
    ev["output_moved_first"] = result.module
    layers = ev.get("layers") or {}
    ev["moved_first"] = layers.get("moved_first")
    return ev


#: How a statistic is named in a Finding's message.
_STAT_WORDS = {
    "attn_max_logit": "attention max logit",
    "log_z": "output log Z",
    "grad_norm": "gradient norm",
}


def _moved_words(forensics: dict[str, Any]) -> str:
    first = forensics.get("moved_first")
    if isinstance(first, dict):
        stat = _STAT_WORDS.get(first.get("statistic"), first.get("statistic"))
        ratio = first.get("ratio")
        times = f"{ratio:.3g}x" if isinstance(ratio, float) and math.isfinite(ratio) else "inf"
        healthy = (forensics.get("layers") or {}).get("healthy_step")
        return (
            f"; the first layer statistic to move: the {stat} of {first.get('layer')}, "
            f"{times} its value at step {healthy}"
        )
    if forensics.get("layers"):
        factor = forensics["layers"].get("factor")
        return f"; no layer statistic moved {factor:g}x (attention max logit, log Z, grad norm)"
    out = forensics.get("output_moved_first")
    return f"; {out} moved first (max |output|)" if out else ""


def spike_where(forensics: dict[str, Any]) -> str | None:
    """The Finding's ``where``: the layer that moved first, else the module whose max
    |output| did."""
    first = forensics.get("moved_first")
    if isinstance(first, dict) and first.get("layer"):
        return str(first["layer"])
    return forensics.get("output_moved_first")


def _describe(forensics: dict[str, Any]) -> str:
    cause = forensics.get("cause")
    if cause is None:
        return f" Forensics: no replay ({forensics.get('reason')})."
    if cause == "transient":
        return " Forensics: replaying the kept steps from the snapshot did not reproduce it."
    what = {
        "data": "the batch alone spikes the snapshot's healthy model (cause: data)",
        "state": "the batch does not spike the snapshot's model: the updates since did (cause: "
        "state)",
    }.get(cause, f"cause: {cause}")
    where = _moved_words(forensics)
    return f" Forensics: the replay reproduces it at step {forensics.get('step')}: {what}{where}."


def spike_finding(
    spike: Spike,
    detector: SpikeDetector,
    *,
    interval: tuple[int, int],
) -> Finding:
    """The live ``train.loss-spikes`` Finding of one episode."""
    ratio = spike.ratio
    warn = (ratio is not None and ratio >= WARN_RATIO) or detector.episodes >= WARN_COUNT
    steps = spike.steps
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    evidence: dict[str, Any] = {
        **spike.to_evidence(),
        "interval": list(interval),
        "episodes_so_far": detector.episodes,
        "window": detector.window,
        "z": detector.z,
        "rel": detector.rel,
        "source": "per-step losses (live)",
    }
    if spike.action is not None:
        evidence["guard_action"] = spike.action
    if spike.forensics:
        evidence["forensics"] = spike.forensics
    times = f" ({ratio:.2f}x)" if ratio is not None else ""
    told = _describe(spike.forensics) if spike.forensics else ""
    return Finding(
        id="train.loss-spikes",
        severity=Severity.WARNING if warn else Severity.INFO,
        title="Loss spike",
        message=(
            f"The per-step loss spiked at {span}: {spike.peak_value:.4g} at step "
            f"{spike.peak_step} against a trailing median of {spike.baseline:.4g}{times}, "
            f"{spike.robust_z:.1f} robust sigmas above it." + told
        ),
        where=spike_where(spike.forensics) if spike.forensics else None,
        step=steps[0],
        evidence=evidence,
        recommendation=(
            "Look at the batches of those steps (corrupted, repeated or very long samples); "
            "if the state caused it, lower the peak LR or lengthen warmup, clip gradients at "
            "1.0, and for attention-logit growth consider QK-norm or z-loss. "
            "Monitor(on_spike='rollback') restores the last snapshot and skips the batches."
        ),
    )
