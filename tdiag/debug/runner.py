"""Run the registered checks on a CheckContext.

A check that raises is reported with status "error" and the message, never a crash; a
check raising :class:`SkipCheck` is "skipped" with the reason. After each check the model's
train/eval modes, ``requires_grad`` flags and ``.grad`` tensors are put back, so one check
cannot change what the next one sees. When a :func:`~tdiag.debug.usercode.deadline` is
reached in the middle of the checks, the finished checks keep their results, the running one
is "error" ("timed out after N s") and the others are "skipped" ("not run: --timeout
reached").

The ``tdiag check`` command lives in :mod:`tdiag.debug.command` (re-exported here); it runs
these functions in a separate process (:mod:`tdiag.debug.worker`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from tdiag.debug import CHECKS  # looking it up registers every family
from tdiag.debug.command import check_command
from tdiag.debug.context import CheckContext
from tdiag.debug.probes import fastpath_off
from tdiag.debug.registry import CheckSpec, SkipCheck
from tdiag.debug.results import NOT_RUN_REASON, STATUSES, CheckResult, CheckRun
from tdiag.debug.usercode import DeadlineExceeded
from tdiag.findings import Severity

__all__ = [
    "NOT_RUN_REASON",
    "STATUSES",
    "CheckResult",
    "CheckRun",
    "check_command",
    "run_checks",
    "select_checks",
]

logger = logging.getLogger(__name__)

#: On a CPU, models below this many parameters are checked with one intra-op thread (unless
#: OMP_NUM_THREADS is set): their ops are too small to gain from threads, and on a busy
#: machine OpenMP threads that wait for a core make them several times slower (measured: all
#: checks on the reference model 4 s single-threaded vs 12 s with 2 threads on 2 busy cores).
SINGLE_THREAD_MAX_PARAMS = 5_000_000


@contextlib.contextmanager
def _cpu_threads(ctx: CheckContext) -> Iterator[None]:
    """One intra-op thread for a small model on a CPU, restored afterwards."""
    n_params = sum(p.numel() for p in ctx.model.parameters())
    small = ctx.device.type == "cpu" and n_params < SINGLE_THREAD_MAX_PARAMS
    if not small or "OMP_NUM_THREADS" in os.environ:  # env read at the CLI edge
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _split(ids: str | Iterable[str] | None) -> list[str]:
    if ids is None:
        return []
    items = ids.split(",") if isinstance(ids, str) else list(ids)
    return [i.strip() for i in items if i.strip()]


def _match(pattern: str) -> list[str]:
    """Ids selected by one pattern: an exact id, a family name, or a glob (``grad.*``)."""
    if pattern in CHECKS:
        return [pattern]
    by_family = [i for i, s in CHECKS.items() if s.family == pattern]
    if by_family:
        return by_family
    return [i for i in CHECKS if fnmatch.fnmatchcase(i, pattern)]


def select_checks(
    only: str | Iterable[str] | None = None, skip: str | Iterable[str] | None = None
) -> list[CheckSpec]:
    """The checks to run, in registration order.

    Args:
        only: ids (or family names, or globs) to run; None = all.
        skip: ids (or family names, or globs) to leave out.

    Raises:
        ValueError: an id matches no registered check (the message lists the known ids).
    """
    unknown: list[str] = []
    selected: set[str] = set(CHECKS)
    only_ids = _split(only)
    if only_ids:
        selected = set()
        for pat in only_ids:
            hits = _match(pat)
            if not hits:
                unknown.append(pat)
            selected.update(hits)
    for pat in _split(skip):
        hits = _match(pat)
        if not hits:
            unknown.append(pat)
        selected.difference_update(hits)
    if unknown:
        raise ValueError(
            f"unknown check id(s): {', '.join(unknown)}. Known ids: {', '.join(CHECKS)} "
            f"(a family name such as 'numerics' or a glob such as 'grad.*' also works)."
        )
    return [s for s in CHECKS.values() if s.id in selected]


class _ModelState:
    """Snapshot of what a check could change on the model: modes, requires_grad, .grad and
    buffers (BatchNorm running statistics move in a train-mode forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grad_enabled = torch.is_grad_enabled()

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        for p, rg, grad in self.params:
            p.requires_grad_(rg)
            p.grad = grad
        with torch.no_grad():
            for b, saved in self.buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        torch.set_grad_enabled(self.grad_enabled)


def _run_one(spec: CheckSpec, ctx: CheckContext) -> CheckResult:
    state = _ModelState(ctx.model)
    torch.manual_seed(ctx.seed)  # every check sees the same random stream, whatever ran before
    t0 = time.perf_counter()
    try:
        blocked = ctx.cache.get("blocked")
        if blocked and spec.family != "data":
            raise SkipCheck(blocked)
        with fastpath_off(ctx.model):  # no nested tensors; the same kernels with and without hooks
            findings = list(spec.fn(ctx) or [])
    except SkipCheck as exc:
        return CheckResult(spec.id, "skipped", time.perf_counter() - t0, message=str(exc))
    except (
        Exception
    ) as exc:  # a broken check (or the user's model inside it) must not crash the run
        logger.debug("check %s raised", spec.id, exc_info=True)
        return CheckResult(
            spec.id, "error", time.perf_counter() - t0, message=f"{type(exc).__name__}: {exc}"
        )
    finally:
        state.restore()
    bad = any(f.severity in (Severity.ERROR, Severity.WARNING) for f in findings)
    return CheckResult(spec.id, "fail" if bad else "pass", time.perf_counter() - t0, findings)


def run_checks(
    ctx: CheckContext,
    only: str | Iterable[str] | None = None,
    skip: str | Iterable[str] | None = None,
    *,
    on_start: Callable[[CheckSpec, int, int], None] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> CheckRun:
    """Run the selected checks on ``ctx``.

    Args:
        ctx: the context (model, batch, ...).
        only, skip: see :func:`select_checks`.
        on_start: called as ``on_start(spec, index, total)`` before each check (progress).
        on_result: called with each check's result as soon as it is known (the check
            process of ``tdiag check`` sends it to the parent then, so that it is kept
            whatever happens to the process later).

    Raises:
        ValueError: unknown ids in ``only``/``skip``.
    """
    specs = select_checks(only, skip)
    t0 = time.perf_counter()
    results: list[CheckResult] = []
    timed_out: DeadlineExceeded | None = None
    timed_out_check: str | None = None
    for i, spec in enumerate(specs):
        t_check = time.perf_counter()
        try:
            if on_start is not None:
                on_start(spec, i, len(specs))
            results.append(_run_one(spec, ctx))
            if on_result is not None:
                on_result(results[-1])
        except DeadlineExceeded as exc:  # --timeout: keep what finished, report the rest
            timed_out, timed_out_check = exc, spec.id
            seconds = time.perf_counter() - t_check
            results.append(
                CheckResult(
                    spec.id,
                    "error",
                    seconds,
                    message=f"timed out after {exc.seconds:g} s (--timeout; this check ran "
                    f"{seconds:.1f} s and was stopped)",
                )
            )
            results.extend(
                CheckResult(s.id, "skipped", 0.0, message=NOT_RUN_REASON) for s in specs[i + 1 :]
            )
            break
    return CheckRun(
        results,
        time.perf_counter() - t0,
        meta=_meta(ctx),
        timed_out=timed_out,
        timed_out_check=timed_out_check,
    )


def _meta(ctx: CheckContext) -> dict[str, Any]:
    n_params = sum(p.numel() for p in ctx.model.parameters())
    return {
        "model": type(ctx.model).__name__,
        "parameters": n_params,
        "batch_shape": tuple(ctx.input_ids.shape),
        "batch_source": "file" if ctx.batch_from_file else "random",
        "vocab_size": ctx.vocab_size,
        "causal": ctx.causal,
        "device": str(ctx.device),
    }


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for, but this PyTorch has no CUDA device available "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); use --device cpu."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev
