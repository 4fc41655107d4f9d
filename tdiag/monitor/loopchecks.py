"""Silent bugs in the training loop, caught live: the loop checks of the Monitor.

Each check is a pure function of one log step's :class:`LoopObservation` (and the run's
:class:`LoopMemory`) registered under its stable Finding id (docs/checks.md, "Loop
checks"); each id is raised at most once per run and can be silenced with
``Monitor(ignore=[...])``. What they read is gathered by :class:`LoopWatch` on log steps
only and rides on the log step's one host transfer:

- tensor hooks (``Tensor.register_hook``, before accumulation) on the trainable parameters,
  attached with the log step's other probes: the first gradient a parameter gets in the
  armed step shows whether ``.grad`` still held an earlier step's gradient
  (``loop.grad-accumulating``), and whether the optimizer holds the parameter at all
  (``loop.params-not-in-optimizer``);
- the Monitor's forward pre-hook on the root module: on the armed step's training forward,
  which dropout / batch-statistics modules are in eval mode (``loop.eval-mode-training``);
  on any forward without gradient, whether dropout is active (``loop.train-mode-eval``: a
  Python attribute read per forward, nothing else); on the two steps ending at a log step,
  a fingerprint of the input ids on the device (``data.repeated-batch``);
- the gradient probe: the update of each parameter (``loop.params-not-updated``), the norm
  of the gradient the step used (``loop.clip-after-step``);
- the optimizer step count (``loop.optimizer-replaced``) and, under DDP, each rank's
  parameter norms in the log step's gather (``dist.weights-desync``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tdiag.findings import Finding, Severity
from tdiag.monitor.metrics import DeviceBatch, per_tensor_sq_norms, to_local

__all__ = ["LOOP_CHECKS", "LoopMemory", "LoopObservation", "LoopWatch"]

logger = logging.getLogger(__name__)

# A parameter's update counts as none when it is exactly zero (no optimizer step leaves a
# parameter with a gradient bit-identical, unless its LR, or its whole step, is zero).
STALE_SAMPLE = 4
"""``loop.grad-accumulating``: stale gradients measured on the first few parameters (one
small kernel each, on log steps); the others are only counted."""
CLIP_TOLERANCE = 1e-3
"""``loop.clip-after-step``: the used gradient exceeds the threshold by more than 0.1 %
(``clip_grad_norm_`` leaves it at ``max_norm * (1 - 1e-6 / norm)``)."""
CLIP_MIN_LOG_STEPS = 3
CLIP_SHARE = 0.5
"""...on more than half of at least 3 probed log steps."""
DESYNC_RTOL = 1e-6
"""``dist.weights-desync``: ranks' squared parameter norms differ by more than this (relative);
DDP replicas are bit-identical, so any difference is a desync."""

_BATCH_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _stochastic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose behaviour differs between train and eval mode: dropout with p > 0,
    batch/instance norm with running statistics, and modules with a ``dropout`` float > 0
    (``nn.MultiheadAttention``, many attention implementations)."""
    out = []
    for name, m in model.named_modules():
        if (
            (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
            or (isinstance(m, _BATCH_STATS) and getattr(m, "track_running_stats", False))
            or (isinstance(getattr(m, "dropout", None), float) and m.dropout > 0)
        ):
            out.append((name, m))
    return out


def _is_dropout(m: nn.Module) -> bool:
    return not isinstance(m, _BATCH_STATS)


def _frozen(m: nn.Module) -> bool:
    """A batch-norm layer in eval mode with frozen affine parameters: frozen on purpose."""
    params = list(m.parameters(recurse=False))
    return isinstance(m, _BATCH_STATS) and all(not p.requires_grad for p in params)


def _pad_counts(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """``[pad positions with a label != -100, pad positions]`` of a forward called with
    ``labels=`` and ``attention_mask=`` (Hugging Face style), on the device; else None."""
    batch = kwargs if "labels" in kwargs else next((a for a in args if isinstance(a, Mapping)), {})
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    if not (isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor)):
        return None
    if labels.shape != mask.shape:
        return None
    with torch.no_grad():
        pad = mask == 0
        return torch.stack([(pad & (labels != -100)).sum(), pad.sum()]).float()


def _input_ids(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None:
        for a in args:
            if isinstance(a, Mapping):
                a = a.get("input_ids")
            if isinstance(a, torch.Tensor):
                ids = a
                break
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel() > 0:
        return ids
    return None


@dataclass
class LoopObservation:
    """What one log step saw (host values, after the one transfer)."""

    step: int
    host: Mapping[str, Any]
    metrics: Mapping[str, float]
    steps_in_interval: int
    optimizer_steps_in_interval: int | None
    """``optimizer.step()`` calls in the interval (None: no optimizer given)."""
    probed_skipped: bool
    clip: float | None
    stale_names: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    eval_modules: list[str] | None = None
    train_mode_eval: tuple[int, list[str]] | None = None
    update_names: list[str] = field(default_factory=list)
    update_groups: list[int] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    replicated: bool = False
    """The model is wrapped in DistributedDataParallel (its replicas must be identical)."""


@dataclass
class LoopMemory:
    """What the checks remember across log steps."""

    stale_seen: int = 0
    stuck_prev: set[str] = field(default_factory=set)
    clip_seen: int = 0
    clip_above: int = 0
    clip_max_ratio: float = 0.0
    first_clip_above: int | None = None
    replicas_equal_seen: bool = False


CheckFn = Callable[[LoopObservation, LoopMemory], "Finding | None"]
LOOP_CHECKS: dict[str, CheckFn] = {}


def register_loop_check(fid: str) -> Callable[[CheckFn], CheckFn]:
    def deco(fn: CheckFn) -> CheckFn:
        if fid in LOOP_CHECKS:
            raise ValueError(f"loop check {fid!r} registered twice")
        LOOP_CHECKS[fid] = fn
        return fn

    return deco


def _finding(fid: str, severity: Severity, title: str, **kw: Any) -> Finding:
    return Finding(id=fid, severity=severity, title=title, **kw)


def _names(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# ----------------------------------------------------------------------------- the checks
@register_loop_check("loop.grad-accumulating")
def grad_accumulating(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    stale = obs.host.get("loop/stale_sq")
    total = stale[0] if stale else 0.0
    # Step 1's could be a stray backward before training; from step 2 on it is the loop.
    if not (total > 0 and obs.stale_names) or obs.step < 2:
        return None
    mem.stale_seen += 1
    names = obs.stale_names
    new = obs.metrics.get("train/grad_norm")
    return _finding(
        "loop.grad-accumulating",
        Severity.ERROR,
        "Gradients are never cleared between optimizer steps",
        message=(
            f"At the first backward of step {obs.step}, .grad of {len(names)} parameter(s) "
            f"still held a gradient from earlier steps (norm {math.sqrt(total):.4g} over the "
            f"first {min(len(names), STALE_SAMPLE)}"
            + (f"; this step's own gradient norm {new:.4g}" if new is not None else "")
            + "): every step adds to the sum of all earlier gradients. Seen on "
            f"{mem.stale_seen} log steps."
        ),
        where=names[0],
        step=obs.step,
        evidence={
            "stale_grad_norm": math.sqrt(total),
            "stale_grad_norm_of": min(len(names), STALE_SAMPLE),
            "grad_norm": new,
            "params_with_stale_grad": len(names),
            "examples": names[:5],
            "log_steps_seen": mem.stale_seen,
        },
        recommendation=(
            "Call optimizer.zero_grad(set_to_none=True) once per optimizer step (before the "
            "forward, or right after optimizer.step()). With gradient accumulation, clear once "
            "per optimizer step, not per epoch and not never."
        ),
    )


@register_loop_check("loop.params-not-in-optimizer")
def params_not_in_optimizer(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    if not obs.orphans or obs.optimizer_steps_in_interval is None:
        return None
    return _finding(
        "loop.params-not-in-optimizer",
        Severity.ERROR,
        f"{len(obs.orphans)} trainable parameter(s) get gradients but no optimizer holds them",
        message=(
            f"{_names(obs.orphans)} received gradients at step {obs.step} but are in no param "
            "group of the optimizer given to the Monitor: they are never updated."
        ),
        where=obs.orphans[0],
        step=obs.step,
        evidence={"count": len(obs.orphans), "params": obs.orphans[:20]},
        recommendation=(
            "Build the optimizer after the model is final (a head replaced after "
            "torch.optim.X(model.parameters()) is not in it), check the filter that builds "
            "the param groups, or add them with optimizer.add_param_group(). Frozen on "
            "purpose? Set requires_grad=False on them."
        ),
    )


@register_loop_check("loop.params-not-updated")
def params_not_updated(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    stuck = obs.host.get("probe/stuck")
    if stuck is None or obs.probed_skipped:
        return None
    now = {n for n, v in zip(obs.update_names, stuck, strict=False) if v > 0}
    both, mem.stuck_prev = now & mem.stuck_prev, now
    if not both:
        return None
    names = [n for n in obs.update_names if n in both]
    groups = sorted(
        {g for n, g in zip(obs.update_names, obs.update_groups, strict=False) if n in both}
    )
    lrs = {g: obs.metrics.get("train/lr" if g == 0 else f"train/lr/{g}") for g in groups}
    return _finding(
        "loop.params-not-updated",
        Severity.ERROR,
        f"{len(names)} parameter(s) have gradients but are not updated",
        message=(
            f"{_names(names)} had non-zero gradients at two log steps in a row (the last: step "
            f"{obs.step}) and optimizer.step() left them exactly unchanged; param group(s) "
            f"{groups} with LR {', '.join(f'{v:g}' for v in lrs.values() if v is not None) or '?'}."
        ),
        where=names[0],
        step=obs.step,
        evidence={"count": len(names), "params": names[:20], "param_groups": groups, "lrs": lrs},
        recommendation=(
            "Check the LR of those param groups (an LR of 0 by mistake, a layer-wise LR scheme "
            "off by one, a scheduler that multiplies one group by 0) and any code that "
            "restores these parameters after the step."
        ),
    )


@register_loop_check("loop.eval-mode-training")
def eval_mode_training(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    mods = obs.eval_modules
    if not mods or obs.probed_skipped or not obs.optimizer_steps_in_interval:
        return None
    return _finding(
        "loop.eval-mode-training",
        Severity.ERROR,
        "Training with the model in eval mode",
        message=(
            f"The training forward of step {obs.step} (with gradients, and an optimizer step "
            f"after it) ran with {_names(mods)} in eval mode: dropout is off and batch "
            "statistics are frozen while the model trains."
        ),
        where=mods[0],
        step=obs.step,
        evidence={"modules_in_eval_mode": mods[:20], "count": len(mods)},
        recommendation=(
            "Call model.train() after validation (model.eval() is sticky). Batch-norm frozen "
            "on purpose: set requires_grad=False on its weight and bias (then it is not "
            "reported)."
        ),
    )


@register_loop_check("loop.train-mode-eval")
def train_mode_eval(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    if obs.train_mode_eval is None:
        return None
    at, mods = obs.train_mode_eval
    return _finding(
        "loop.train-mode-eval",
        Severity.WARNING,
        "Evaluation forward with dropout active",
        message=(
            f"A forward without gradients (evaluation) after step {at} ran in train mode with "
            f"dropout active in {_names(mods)}: the evaluation loss is measured with dropout "
            "on (noisier and biased upward)."
        ),
        where=mods[0],
        step=at,
        evidence={"active_dropout_modules": mods[:20], "after_step": at},
        recommendation="Call model.eval() before evaluating (and model.train() after).",
    )


@register_loop_check("loop.optimizer-replaced")
def optimizer_replaced(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    bwd = obs.host.get("probe/bwd_sq")
    if obs.optimizer_steps_in_interval != 0 or obs.steps_in_interval < 2 or bwd is None:
        return None
    if not math.isfinite(bwd[0]):  # a scaler skipping every step: train.skipped-steps
        return None
    return _finding(
        "loop.optimizer-replaced",
        Severity.ERROR,
        "The optimizer given to the Monitor stopped stepping",
        message=(
            f"Over the {obs.steps_in_interval} steps up to step {obs.step} the optimizer "
            "given to the Monitor never stepped, while backward passes went on (finite "
            "gradients): the loop steps another optimizer."
        ),
        step=obs.step,
        evidence={"steps_without_optimizer_step": obs.steps_in_interval},
        recommendation=(
            "Create the optimizer once, before the loop (re-creating it, e.g. every epoch, "
            "throws Adam's moments away and restarts its bias correction), and pass that one "
            "to the Monitor. If you replace it on purpose, create a new Monitor for it."
        ),
    )


@register_loop_check("loop.clip-after-step")
def clip_after_step(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    used = obs.metrics.get("train/grad_norm_post_clip")
    if obs.clip is None or used is None or not math.isfinite(used) or obs.probed_skipped:
        return None
    mem.clip_seen += 1
    if used > obs.clip * (1 + CLIP_TOLERANCE):
        mem.clip_above += 1
        mem.clip_max_ratio = max(mem.clip_max_ratio, used / obs.clip)
        if mem.first_clip_above is None:
            mem.first_clip_above = obs.step
    if mem.clip_seen < CLIP_MIN_LOG_STEPS or mem.clip_above <= CLIP_SHARE * mem.clip_seen:
        return None
    return _finding(
        "loop.clip-after-step",
        Severity.ERROR,
        "Gradient clipping does not reach optimizer.step()",
        message=(
            f"The clip threshold is {obs.clip:g}, but the gradient optimizer.step() used was "
            f"above it on {mem.clip_above} of {mem.clip_seen} measured log steps (up to "
            f"{mem.clip_max_ratio:.3g}x; step {obs.step}: {used:.4g}): clipping runs after the "
            "step, on other parameters, or not at all."
        ),
        step=mem.first_clip_above,
        evidence={
            "clip_threshold": obs.clip,
            "used_grad_norm": used,
            "log_steps_above": mem.clip_above,
            "log_steps_measured": mem.clip_seen,
            "max_ratio": mem.clip_max_ratio,
        },
        recommendation=(
            "Call clip_grad_norm_(model.parameters(), max_norm) after backward() (after "
            "scaler.unscale_(optimizer) with a GradScaler) and before optimizer.step(), on the "
            "parameters the optimizer updates. Not clipping on purpose? Drop the threshold "
            "from the config (or pass clip=None)."
        ),
    )


@register_loop_check("data.repeated-batch")
def repeated_batch(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    same = obs.host.get("loop/same_batch")
    if same is None or not same[0] >= 1.0:
        return None
    return _finding(
        "data.repeated-batch",
        Severity.ERROR,
        "The same batch in consecutive steps",
        message=(
            f"Steps {obs.step - 1} and {obs.step} got identical input ids: the loop trains "
            "on the same batch again (e.g. next(iter(loader)) inside the loop creates a fresh "
            "iterator, and returns its first batch, every step)."
        ),
        step=obs.step,
        evidence={"steps": [obs.step - 1, obs.step]},
        recommendation=(
            "Create the iterator once (it = iter(loader), then next(it) per step; or "
            "for batch in loader). Overfitting one batch on purpose? "
            "Monitor(ignore=['data.repeated-batch'])."
        ),
    )


@register_loop_check("data.pad-in-loss")
def pad_in_loss(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    counts = obs.host.get("loop/pad_in_loss")
    if counts is None or not counts[0] > 0:
        return None
    counted, pads = counts[0], counts[1]
    return _finding(
        "data.pad-in-loss",
        Severity.WARNING,
        "Padding positions count in the loss",
        message=(
            f"In the training batch of step {obs.step}, {counted:.0f} of {pads:.0f} padded "
            "positions (attention_mask == 0) carry a label that is not -100: the loss "
            "trains the model to predict padding."
        ),
        step=obs.step,
        evidence={
            "pad_positions_in_loss": counted,
            "pad_positions": pads,
            "fraction": counted / pads if pads else None,
        },
        recommendation=(
            "Set labels[attention_mask == 0] = -100 (the ignore_index of cross_entropy), or "
            "use a collator that does (transformers' DataCollatorForLanguageModeling)."
        ),
    )


@register_loop_check("dist.weights-desync")
def weights_desync(obs: LoopObservation, mem: LoopMemory) -> Finding | None:
    per_rank = obs.host.get("loop/param_sq")
    if per_rank is None or len(per_rank) < 2:
        return None
    totals = [math.fsum(r) for r in per_rank]
    ref = totals[0]
    worst = max(range(len(totals)), key=lambda r: abs(totals[r] - ref))
    if not abs(totals[worst] - ref) > DESYNC_RTOL * max(abs(ref), 1e-30):
        mem.replicas_equal_seen = True
        return None
    if not (obs.replicated or mem.replicas_equal_seen):
        return None  # different from the start and not DDP-wrapped: not replicas
    diffs = [
        i
        for i in range(len(per_rank[0]))
        if abs(per_rank[worst][i] - per_rank[0][i]) > DESYNC_RTOL * max(abs(per_rank[0][i]), 1e-30)
    ]
    names = [obs.param_names[i] for i in diffs if i < len(obs.param_names)]
    return _finding(
        "dist.weights-desync",
        Severity.ERROR,
        f"Model replicas differ across ranks (rank {worst} vs rank 0)",
        message=(
            f"At step {obs.step} the squared parameter norm is {ref:.10g} on rank 0 and "
            f"{totals[worst]:.10g} on rank {worst}; {len(names)} parameter tensor(s) differ "
            f"({_names(names)}). Data-parallel replicas must stay bit-identical."
        ),
        where=names[0] if names else None,
        step=obs.step,
        evidence={
            "param_sq_per_rank": totals,
            "rank": worst,
            "differing_params": names[:20],
        },
        recommendation=(
            "Look for a rank-dependent update: parameters changed outside the optimizer on "
            "some ranks (an EMA, a re-initialisation, a load on rank 0 only without "
            "broadcast), a model not wrapped in DDP, no_sync() on the step that should "
            "all-reduce, or different seeds for the initial weights without DDP's broadcast."
        ),
    )


# ------------------------------------------------------------------------------ the watch
class LoopWatch:
    """Gathers what the loop checks need, on log steps only, and runs them.

    Args:
        model: the monitored model; optimizer: the Monitor's optimizer (or None).
        names: ``id(param) -> name``; clip: the clipping threshold, if known.
        ignore: ids not to raise; distributed: under torchrun (``dist.weights-desync``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        names: Mapping[int, str],
        *,
        clip: float | None,
        ignore: Sequence[str] = (),
        distributed: bool = False,
        sharded: bool = False,
    ) -> None:
        self.model, self.optimizer, self._names, self.clip = model, optimizer, names, clip
        self.ignore = set(ignore)
        self.distributed, self.sharded = distributed, sharded
        self.raised: set[str] = set()
        self.memory = LoopMemory()
        self.enabled = True
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._stochastic = _stochastic_modules(model)
        from torch.nn.parallel import DistributedDataParallel

        self._replicated = isinstance(model, DistributedDataParallel)
        self.armed = False
        self._handles: list[Any] = []
        self._seen: set[int] = set()
        self._stale: list[tuple[str, torch.Tensor]] = []
        self._orphans: list[str] = []
        self._eval_modules: list[str] | None = None
        self._train_mode_eval: tuple[int, list[str]] | None = None
        self.fingerprint_next = False
        self._pad_counts: torch.Tensor | None = None
        self._fp_taken = False
        self._fp_cur: tuple | None = None
        self._fps: dict[int, tuple] = {}
        self._fp_weights: dict[tuple, torch.Tensor] = {}
        self.step = 0  # the Monitor's current step (for the evaluation-forward check)

    def _active(self, fid: str) -> bool:
        return self.enabled and fid not in self.raised and fid not in self.ignore

    # -- arming (with the Monitor's other log-step probes) ---------------------------------
    def arm(self) -> None:
        self.armed = True
        self._seen, self._stale, self._orphans, self._eval_modules = set(), [], [], None
        watch = self._active("loop.grad-accumulating") or self._active(
            "loop.params-not-in-optimizer"
        )
        if not watch or self._handles:
            return
        opt_ids = None
        if self.optimizer is not None:
            opt_ids = {id(q) for g in self.optimizer.param_groups for q in g["params"]}
        try:
            for p in self._params:
                self._handles.append(p.register_hook(self._grad_hook(p, opt_ids)))
        except RuntimeError as exc:
            logger.debug("tdiag: no loop-check gradient hooks (%r)", exc)
            self.disarm()

    def disarm(self) -> None:
        self.armed = False
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grad_hook(self, p: torch.Tensor, opt_ids: set[int] | None) -> Callable:
        pid = id(p)

        def hook(grad: torch.Tensor) -> None:
            if pid in self._seen:  # only the first gradient of the armed step matters
                return
            self._seen.add(pid)
            try:
                name = self._names.get(pid, "?")
                if opt_ids is not None and pid not in opt_ids:
                    self._orphans.append(name)  # never cleared by optimizer.zero_grad() either
                    return
                old = p.grad
                if old is not None:  # before accumulation: what earlier backwards left
                    # Measured now (the buffer is accumulated into in place next), for the
                    # first few only: zero_grad() clears all or none, so a handful tells.
                    sq = None
                    if len(self._stale) < STALE_SAMPLE:
                        with torch.no_grad():
                            sq = to_local(old).detach().float().square().sum()
                    self._stale.append((name, sq))
            except Exception as exc:  # a monitoring failure never stops training
                logger.warning("tdiag: loop checks disabled (%r)", exc)
                self.enabled = False

        return hook

    # -- forwards (the Monitor's root pre-hook) --------------------------------------------
    def on_forward(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if not torch.is_grad_enabled():
            if (
                self.model.training
                and self._train_mode_eval is None
                and self._active("loop.train-mode-eval")
            ):
                active = [
                    n or "<root>" for n, m in self._stochastic if m.training and _is_dropout(m)
                ]
                if active:
                    self._train_mode_eval = (self.step, active)
            return
        if self.armed and self._eval_modules is None:
            self._eval_modules = [
                n or "<root>" for n, m in self._stochastic if not m.training and not _frozen(m)
            ]
        if self.armed and self._pad_counts is None and self._active("data.pad-in-loss"):
            self._pad_counts = _pad_counts(args, kwargs)
        if self.fingerprint_next and not self._fp_taken:
            self._fp_taken = True
            ids = _input_ids(args, kwargs)
            if ids is not None:
                self._fp_cur = (tuple(ids.shape), self._fingerprint(ids))

    def _fingerprint(self, ids: torch.Tensor) -> torch.Tensor:
        key = (ids.numel(), ids.device)
        w = self._fp_weights.get(key)
        if w is None:
            g = torch.Generator().manual_seed(ids.numel())
            w = torch.randint(1, 2**20, (ids.numel(),), generator=g).to(ids.device)
            self._fp_weights = {key: w}
        flat = ids.detach().reshape(-1).to(torch.int64)
        return torch.stack([(flat * w).sum(), flat.sum()])

    def end_step(self, step: int, *, fingerprint_next: bool) -> None:
        """After the Monitor recorded ``step``: keep its fingerprint, decide the next one."""
        self.step = step
        if self._fp_cur is not None:
            self._fps[step] = self._fp_cur
        self._fp_cur, self._fp_taken = None, False
        self.fingerprint_next = fingerprint_next and self._active("data.repeated-batch")

    # -- the log step ----------------------------------------------------------------------
    def add_to(self, batch: DeviceBatch, step: int) -> None:
        if not self.enabled:
            return
        # Every rank adds the same entries (one all_gather of equal-length vectors).
        stale: torch.Tensor | float = 0.0
        sampled = [t for _, t in self._stale if t is not None]
        if sampled:
            stale = torch.stack([t.to(sampled[0].device) for t in sampled]).sum()
        batch.add("loop/stale_sq", stale, "max")
        a, b = self._fps.get(step - 1), self._fps.get(step)
        same: torch.Tensor | float = 0.0
        if a is not None and b is not None and a[0] == b[0]:
            same = (a[1] == b[1]).all().float()
        batch.add("loop/same_batch", same, "max")
        pads = self._pad_counts if self._pad_counts is not None else [0.0, 0.0]
        batch.add("loop/pad_in_loss", pads, "sum")
        self._pad_counts = None
        self._fps = {step: b} if b is not None else {}  # log_every 1: next step compares it
        if self.distributed and not self.sharded and self._active("dist.weights-desync"):
            params = [to_local(p).detach() for p in self._params if p.numel()]
            if params:
                batch.add("loop/param_sq", per_tensor_sq_norms(params), "all")

    def check(
        self,
        *,
        step: int,
        host: Mapping[str, Any],
        metrics: Mapping[str, float],
        steps_in_interval: int,
        optimizer_steps: int | None,
        probed_skipped: bool,
        update_names: list[str],
        update_groups: list[int],
    ) -> list[Finding]:
        """Run the checks on this log step's host values; each id at most once per run."""
        if not self.enabled:
            return []
        obs = LoopObservation(
            step=step,
            host=host,
            metrics=metrics,
            steps_in_interval=steps_in_interval,
            optimizer_steps_in_interval=optimizer_steps,
            probed_skipped=probed_skipped,
            clip=self.clip,
            stale_names=[n for n, _ in self._stale],
            orphans=list(self._orphans),
            eval_modules=self._eval_modules,
            train_mode_eval=self._train_mode_eval,
            update_names=update_names,
            update_groups=update_groups,
            param_names=[self._names.get(id(p), "?") for p in self._params if p.numel()],
            replicated=self._replicated,
        )
        self._stale, self._orphans, self._eval_modules = [], [], None
        self._train_mode_eval = None
        out = []
        for fid, fn in LOOP_CHECKS.items():
            if not self._active(fid):
                continue
            try:
                finding = fn(obs, self.memory)
            except Exception as exc:  # a check that cannot run says so once
                logger.warning("tdiag: loop check %s failed and is off (%r)", fid, exc)
                self.ignore.add(fid)
                continue
            if finding is not None:
                self.raised.add(fid)
                out.append(finding)
        return out
