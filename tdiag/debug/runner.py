"""Run the registered checks on a CheckContext, and the ``tdiag check`` command.

A check that raises is reported with status "error" and the message, never a crash; a
check raising :class:`SkipCheck` is "skipped" with the reason. After each check the model's
train/eval modes, ``requires_grad`` flags and ``.grad`` tensors are put back, so one check
cannot change what the next one sees. When ``--timeout`` is reached in the middle of the
checks, the finished checks keep their results, the running one is "error" ("timed out after
N s") and the others are "skipped" ("not run: --timeout reached"); ``tdiag check`` prints them
and exits 2.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tdiag.debug import CHECKS  # importing the package registers every family
from tdiag.debug.context import CheckContext
from tdiag.debug.probes import fastpath_off
from tdiag.debug.registry import CheckSpec, SkipCheck
from tdiag.debug.usercode import DeadlineExceeded
from tdiag.findings import Finding, Severity, count_by_severity, sort_findings

__all__ = ["CheckResult", "CheckRun", "check_command", "run_checks", "select_checks"]

logger = logging.getLogger(__name__)

STATUSES = ("pass", "fail", "skipped", "error")

#: Reason of the checks left out when ``--timeout`` was reached before they started.
NOT_RUN_REASON = "not run: --timeout reached"

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


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        id: the check id.
        status: "pass" (no warning/error finding), "fail" (at least one), "skipped" (did not
            apply; ``message`` says why) or "error" (the check itself raised; ``message``).
        seconds: wall time of the check.
        findings: what it found (info findings do not make it fail).
        message: reason for skipped/error, else "".
    """

    id: str
    status: str
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    message: str = ""


@dataclass
class CheckRun:
    """All results of one run, in the order the checks ran.

    Attributes:
        results: one per selected check.
        seconds: wall time of the run.
        meta: model and batch description.
        timed_out: the :class:`DeadlineExceeded` that stopped the run (``--timeout`` reached
            while ``timed_out_check`` was running), else None. The run is then incomplete.
        timed_out_check: the id of the check that was running at the deadline.
    """

    results: list[CheckResult]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    timed_out: DeadlineExceeded | None = None
    timed_out_check: str | None = None

    @property
    def findings(self) -> list[Finding]:
        """Every finding, worst first."""
        return sort_findings(f for r in self.results for f in r.findings)

    @property
    def summary(self) -> dict[str, int]:
        return count_by_severity(self.findings)

    def to_json(self, target: str) -> dict[str, Any]:
        """Contract 2's object for ``tdiag check --json``."""
        from tdiag import __version__

        out: dict[str, Any] = {
            "tdiag_version": __version__,
            "target": target,
            "summary": self.summary,
            "checks": [
                {"id": r.id, "status": r.status, "seconds": round(r.seconds, 4)}
                # an extra key (the contract allows additions): why skipped / errored
                | ({"reason": r.message} if r.message else {})
                for r in self.results
            ],
            "findings": [f.to_dict() for f in self.findings],
        }
        if self.timed_out is not None:  # extra key, only on an incomplete run (exit code 2)
            out["timed_out"] = {"check": self.timed_out_check, "seconds": self.timed_out.seconds}
        return out


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
) -> CheckRun:
    """Run the selected checks on ``ctx``.

    Args:
        ctx: the context (model, batch, ...).
        only, skip: see :func:`select_checks`.
        on_start: called as ``on_start(spec, index, total)`` before each check (progress).

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


def check_command(
    target: str,
    *,
    json_out: bool = False,
    device: str = "cpu",
    batch_size: int | None = None,
    seq_len: int | None = None,
    only: str | None = None,
    skip: str | None = None,
    seed: int = 0,
    no_causal: bool = False,
    timeout: float | None = 180.0,
) -> int:
    """``tdiag check``: load the file, run the checks, print the report or the JSON.

    Returns:
        0 when no error-level finding, 1 when at least one, 2 when the file could not be
        loaded or run, or the options are invalid (message on stderr).
    """
    from rich.console import Console

    from tdiag.debug import render
    from tdiag.debug.usercode import where_stuck
    from tdiag.loading import LoadError, deadline, load_target, parse_target

    err = Console(stderr=True, highlight=False)
    try:
        dev = _check_device(device)
        select_checks(only, skip)  # validate the ids before spending time on loading
        for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
    except ValueError as exc:
        err.print(f"[bold red]tdiag check:[/] {exc}", markup=True, soft_wrap=True)
        return 2
    random.seed(seed)
    torch.manual_seed(seed)
    path, _ = parse_target(target)
    current = {"what": f"loading {path.name} (building the model, one forward pass)"}

    def on_start(spec: CheckSpec, i: int, n: int) -> None:
        current["what"] = f"running check {spec.id}"
        if status is not None:
            status.update(f"[{i + 1}/{n}] {spec.id}")

    status = None
    spinner = not json_out and err.is_terminal
    try:
        # --json: whatever the user's code prints goes to stderr, so stdout stays one JSON object
        quiet = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
        with quiet, deadline(timeout, user_file=path, what=lambda: current["what"]):
            if spinner:
                status = err.status(f"loading {path.name}")
                status.start()
            try:
                ctx = load_target(
                    target,
                    device=dev,
                    batch_size=batch_size,
                    seq_len=seq_len,
                    seed=seed,
                    no_causal=no_causal,
                )
                with _cpu_threads(ctx):
                    run = run_checks(ctx, only, skip, on_start=on_start)
            finally:
                if status is not None:
                    status.stop()
    except LoadError as exc:
        err.print("[bold red]tdiag check: error:[/] ", end="", markup=True)
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return 2
    if json_out:
        sys.stdout.write(json.dumps(run.to_json(target), allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        render.render_report(run, target=target, console=Console(highlight=False))
    if run.timed_out is not None:
        # the file could not be fully run: Contract 1's exit code 2, with the finished checks'
        # results printed above (stdout) and the cause on stderr
        done = sum(r.status in ("pass", "fail") for r in run.results)
        exc = LoadError(
            f"stopped after {run.timed_out.seconds:g} s (--timeout) while running check "
            f"{run.timed_out_check}; {done} check(s) finished and are reported, the others were "
            "not run. A forward pass that never returns (an endless loop?) is the usual cause. "
            "A model that is only slow: raise --timeout, or --skip the slow check.",
            cause="timeout",
            user_traceback=where_stuck(run.timed_out, path),
        )
        err.print("[bold red]tdiag check: error:[/] ", end="", markup=True)
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return 2
    return 1 if run.summary["errors"] else 0
