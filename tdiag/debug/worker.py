"""The check process of ``tdiag check``: the user's file is imported and checked in a child
process (:mod:`tdiag.debug.child`), watched from outside by the parent (this module).

Why a child: a model file can end the process (``os._exit(0)`` at import or in a forward:
exit status 0 and no output), or defeat an in-process ``--timeout`` (a forward that ignores
SIGALRM, or catches ``BaseException`` around an endless loop). Seen from a parent, each is
an event it can name: the child ended without saying "done", or the deadline passed.

The protocol: the child sends tuples over a pipe as things happen (``ready``, ``phase``
while loading, ``loaded``, ``start``/``result`` per check, ``out`` for what the file
prints, then ``done``, or ``load-error`` / ``bad-option`` / ``exited`` / ``internal-error``);
the parent keeps every finished check's result as it arrives. At the deadline the child's
:mod:`faulthandler` timer dumps its stacks to a file (a C thread: no signal handler of the
user's can stop it), and the parent kills the child (SIGKILL) as soon as the dump is written,
at most :data:`KILL_GRACE_S` later. The stacks give "where it was running"; a native crash
(SIGSEGV) leaves a dump too.

Start-up cost (see docs/debugger.md#the-check-process): on Linux the child is forked from a
parent that has not imported torch (this module and the parent's side of ``tdiag check`` are
torch-free), so torch is imported once, by the child, and the fork costs milliseconds. A
parent that already runs threads (torch's OpenMP pool after its first parallel op: a forked
child would hang in its next one) uses a forkserver instead; macOS and Windows use spawn.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tdiag.debug.child import child_main
from tdiag.debug.results import NOT_RUN_REASON, CheckResult, CheckRun
from tdiag.debug.usercode import (
    DeadlineExceeded,
    LoadError,
    parse_target,
    where_stuck_in_dump,
)

__all__ = ["KILL_GRACE_S", "STARTUP_LIMIT_S", "CheckJob", "run_job", "start_method"]

#: Longest wait for the child's stack dump after the deadline before it is killed anyway.
KILL_GRACE_S = 2.0

#: Longest start-up of the child (importing torch and the checks, CUDA initialisation) before
#: the deadline starts; ``--timeout`` counts from the end of it, as it did in one process.
STARTUP_LIMIT_S = 120.0

#: Seconds a finished child may take to exit before it is killed.
_EXIT_WAIT_S = 1.0

#: Modules a forkserver imports once, so that each child it forks starts with them.
_PRELOAD = ["tdiag.debug.runner", "tdiag.loading"]


@dataclass(frozen=True, kw_only=True)
class CheckJob:
    """The options of one ``tdiag check`` run (sent to the child; see the CLI for each)."""

    target: str
    """``PATH.py[:FACTORY]``."""
    json_out: bool = False
    """``--json``: the child's stdout goes to stderr, so that stdout stays one JSON object."""
    device: str = "cpu"
    """``--device``."""
    batch_size: int | None = None
    """``--batch-size``."""
    seq_len: int | None = None
    """``--seq-len``."""
    only: str | None = None
    """``--only``."""
    skip: str | None = None
    """``--skip``."""
    seed: int = 0
    """``--seed``."""
    no_causal: bool = False
    """``--no-causal``."""
    timeout: float | None = 180.0
    """``--timeout`` in seconds, for loading and checking together; None, 0 or inf: none."""

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout >= 0:  # NaN too
            raise ValueError(f"--timeout must be >= 0 seconds, got {self.timeout!r}")

    @property
    def deadline_s(self) -> float | None:
        """The timeout that is enforced, or None."""
        usable = self.timeout is not None and 0 < self.timeout < math.inf
        return self.timeout if usable else None

    @property
    def path(self) -> Path:
        """The model file's path (the target without ``:FACTORY``)."""
        return parse_target(self.target)[0]


def start_method(device: str) -> str:
    """The multiprocessing start method of the child: "fork" on Linux when it is safe (one
    thread in this process, and no CUDA asked of a process that has imported torch: torch
    refuses CUDA in a child forked after it queried CUDA), else "forkserver" on Linux and
    "spawn" elsewhere (macOS: fork is unsafe with its system libraries; Windows: no fork)."""
    if not sys.platform.startswith("linux"):
        return "spawn"
    cpu = device.split(":")[0].strip().lower() == "cpu"
    if _one_thread() and ("torch" not in sys.modules or cpu):
        return "fork"
    return "forkserver"


def _one_thread() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1  # native threads too (OpenMP's pool)
    except OSError:
        return False


# -- the parent ------------------------------------------------------------------------------


@dataclass
class _Watch:
    """What the parent knows of the child, updated by each message."""

    job: CheckJob
    on_progress: Callable[[str], None]
    what: str = "starting the check process (importing torch and tdiag)"
    thread: int | None = None  # the child's main thread, in its stack dumps
    ready_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ids: list[str] | None = None  # the selected checks, once loaded
    loaded_at: float = 0.0
    results: list[CheckResult] = field(default_factory=list)
    running: str | None = None
    running_since: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ended: tuple[Any, ...] | None = None  # the last message: done, load-error, exited, ...

    def handle(self, message: tuple[Any, ...]) -> None:
        kind, *args = message
        if kind == "out":
            stream = sys.stdout if args[0] == "stdout" else sys.stderr
            stream.write(args[1])
            stream.flush()
        elif kind == "ready":
            self.thread, self.ready_at = args[0], time.monotonic()
            self.what = f"loading {self.job.path.name}"
            self.on_progress(self.what)
        elif kind == "phase":
            self.what = args[0]
            self.on_progress(args[0])
        elif kind == "loaded":
            self.meta, self.ids = args
            self.loaded_at = time.monotonic()
        elif kind == "start":
            check_id, i, n = args
            self.running, self.running_since = check_id, time.monotonic()
            self.what = f"running check {check_id}"
            self.on_progress(f"[{i + 1}/{n}] {check_id}")
        elif kind == "result":
            self.results.append(args[0])
            self.running = None
            self.what = f"between checks (after {args[0].id})"
        else:  # done, load-error, bad-option, exited, internal-error: the child's last word
            self.ended = message

    def wait_limit(self) -> float | None:
        """Seconds until the deadline (or the start-up limit); None: no deadline."""
        if self.ready_at is None:
            limit = max(STARTUP_LIMIT_S, self.job.deadline_s or 0.0)
            return limit - (time.monotonic() - self.started)
        if self.job.deadline_s is None:
            return None
        return self.job.deadline_s - (time.monotonic() - self.ready_at)


def run_job(job: CheckJob, *, on_progress: Callable[[str], None] | None = None) -> CheckRun:
    """Run ``tdiag check``'s loading and checks in a child process, with ``job.timeout``
    enforced from outside it.

    Args:
        job: the options.
        on_progress: called with a short line whenever the child starts something (the
            spinner's text).

    Returns:
        The run. ``run.error`` is set when it stopped during the checks (deadline, the file
        ended or crashed the process): the finished checks keep their results, the running
        one is "error" and the others "skipped".

    Raises:
        LoadError: the file could not be loaded (including a deadline reached, or the process
            ended, while loading).
        ValueError: an invalid option (an unknown check id, a device that does not exist).
    """
    context = multiprocessing.get_context(start_method(job.device))
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
    fd, dump_path = tempfile.mkstemp(prefix="tdiag-check-", suffix=".stacks")
    os.close(fd)
    reader, writer = context.Pipe(duplex=False)
    watch = _Watch(job, on_progress or (lambda text: None))
    proc = context.Process(target=child_main, args=(writer, job, dump_path), name="tdiag-check")
    try:
        proc.start()
        writer.close()  # the child holds the only writer: EOF when it ends
        timed_out = _follow(proc, reader, watch)
        if timed_out:
            _drain_until_dump(reader, watch, dump_path, time.monotonic() + KILL_GRACE_S)
        elif proc.is_alive():
            proc.join(_EXIT_WAIT_S)
        dump = Path(dump_path).read_text(encoding="utf-8", errors="replace")
    finally:
        if proc.pid is not None:  # started
            if proc.is_alive():
                proc.kill()  # SIGKILL: nothing the file does can stop it
            proc.join()
        reader.close()
        Path(dump_path).unlink(missing_ok=True)
    return _outcome(watch, proc.exitcode, timed_out and watch.ended is None, dump)


def _follow(proc: multiprocessing.process.BaseProcess, reader: Connection, watch: _Watch) -> bool:
    """Handle the child's messages until its last one, its end, or the deadline (True)."""
    while watch.ended is None:
        limit = watch.wait_limit()
        if limit is not None and limit <= 0:
            return True
        ready = multiprocessing.connection.wait([reader, proc.sentinel], limit)
        if reader in ready:
            try:
                watch.handle(reader.recv())
            except EOFError:
                return False
        elif ready:  # the child ended; what it sent before is still in the pipe
            while watch.ended is None and reader.poll():
                try:
                    watch.handle(reader.recv())
                except EOFError:
                    break
            return False
    return False


def _drain_until_dump(reader: Connection, watch: _Watch, path: str, until: float) -> None:
    """After the deadline: keep what the child still sends (a check that finished at the
    deadline) until its faulthandler timer has written its stacks (it fires at the child's
    deadline, a moment before the parent's), or ``until``."""
    while watch.ended is None and time.monotonic() < until:
        if reader.poll(0.02):
            try:
                watch.handle(reader.recv())
            except EOFError:
                return
        elif os.path.getsize(path) > 0:
            time.sleep(0.05)  # the dump of every thread is written in one go; let it finish
            return


def _outcome(watch: _Watch, exitcode: int | None, timed_out: bool, dump: str) -> CheckRun:
    """The run, or the LoadError / ValueError, from what the child said and how it ended."""
    ended = watch.ended or ()
    kind = ended[0] if ended else None
    seconds = time.monotonic() - watch.loaded_at  # the checks' time, as in a complete run
    if kind == "done":
        return CheckRun(watch.results, ended[1], meta=watch.meta)
    if kind == "bad-option":
        raise ValueError(ended[1])
    if kind == "load-error":
        raise LoadError(ended[1], cause=ended[2], user_traceback=ended[3])
    short, stop = _stop_reason(watch, kind, ended, exitcode, timed_out, dump)
    if watch.ids is None:
        raise stop
    return _partial_run(watch, short, stop, seconds, timed_out)


def _stop_reason(
    watch: _Watch,
    kind: str | None,
    ended: tuple[Any, ...],
    exitcode: int | None,
    timed_out: bool,
    dump: str,
) -> tuple[str, LoadError]:
    """What stopped a child before its "done": a few words (the running check's reason) and
    the LoadError naming the cause."""
    where = where_stuck_in_dump(dump, watch.thread, watch.job.path) if watch.thread else ""
    during = f"while {watch.what}"
    if watch.running is not None:
        ran = time.monotonic() - watch.running_since
        during = f"while running check {watch.running} (it had run {ran:.1f} s)"
    finished = ""  # before the checks: nothing to report
    if watch.ids is not None:
        done = sum(r.status in ("pass", "fail") for r in watch.results)
        finished = f"{done} check(s) finished and are reported, the others were not run"
    if timed_out and watch.ready_at is None:
        short = "tdiag's check process did not start"
        return short, LoadError(
            f"{short} within {STARTUP_LIMIT_S:g} s (importing torch and the checks).",
            cause="internal-error",
        )
    if timed_out:
        short = f"timed out after {watch.job.timeout:g} s (--timeout)"
        return short, LoadError(
            f"stopped after {watch.job.timeout:g} s (--timeout) {during}"
            f"{'; ' + finished if finished else ''}. {_time_spent(watch)}",
            cause="timeout",
            user_traceback=where,
        )
    could_not = (
        f"tdiag could not check it fully ({finished})" if finished else ("tdiag could not check it")
    )
    if kind == "exited":
        short = f"the model file called sys.exit({ended[1]})"
        return short, LoadError(
            f"{short} {during}; {could_not}. Code that exits belongs under "
            "`if __name__ == '__main__':`.",
            cause="exit-called",
            user_traceback=ended[2],
        )
    if kind == "internal-error":
        short = "tdiag's check process failed"
        return short, LoadError(
            f"{short} {during}: a bug in tdiag (please report it, with this message).",
            cause="internal-error",
            user_traceback=ended[1],
        )
    if exitcode is not None and exitcode < 0:
        return _killed(-exitcode, f"{during}; {could_not}", where)
    if watch.ready_at is None and exitcode != 0:
        short = "tdiag's check process did not start"
        return short, LoadError(
            f"{short} (exit status {exitcode}); its error is above.", cause="internal-error"
        )
    short = f"the model file ended the process (os._exit({exitcode}))"
    return short, LoadError(
        f"{short} {during}; {could_not}. A model file must not exit when it is imported or "
        "run: put such code under `if __name__ == '__main__':`.",
        cause="process-ended",
        user_traceback=where,
    )


def _time_spent(watch: _Watch) -> str:
    """Where the ``--timeout`` went (loading, the finished checks, the running one) and the
    likely cause: a check that took most of the budget on its own may never return; a budget
    spread over many checks is a model that is slow at this size."""
    deadline = watch.job.deadline_s or 0.0
    now = time.monotonic()
    parts = []
    if watch.ready_at is not None:
        loaded = watch.loaded_at if watch.ids is not None else now
        parts.append(f"loading took {loaded - watch.ready_at:.1f} s")
    done = [r for r in watch.results if r.seconds > 0]
    if done:
        slowest = sorted(done, key=lambda r: r.seconds, reverse=True)[:3]
        parts.append(
            f"{len(done)} finished check(s) {sum(r.seconds for r in done):.1f} s (slowest: "
            + ", ".join(f"{r.id} {r.seconds:.1f} s" for r in slowest)
            + ")"
        )
    ran = now - watch.running_since if watch.running is not None else 0.0
    if watch.running is not None:
        parts.append(f"{watch.running} {ran:.1f} s until stopped")
    spent = "Time spent: " + "; ".join(parts) + ". " if parts else ""
    shape = watch.meta.get("batch_shape")
    size = f" (batch {tuple(shape)})" if shape else ""
    if watch.running is not None and ran >= 0.5 * deadline:
        cause = (
            f"{watch.running} ran {ran:.1f} s on its own: a forward pass (or decode) that never "
            "returns, or one far slower at this size than the others; the stack above says where "
            f"it was. If it is only slow: raise --timeout, or --skip {watch.running}."
        )
    else:
        cause = (
            f"The model is slow at this size{size}, no single check hung: raise --timeout, "
            "lower --seq-len / --batch-size, or --skip the slowest checks."
        )
    return spent + cause


def _killed(signum: int, during: str, where: str) -> tuple[str, LoadError]:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = ""
    if name == "SIGKILL":
        hint = " Usually the out-of-memory killer: try a smaller model, --batch-size or --seq-len."
    elif name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"):
        hint = " A crash in native code: a C++/CUDA extension, or a kernel given bad memory."
    short = f"the check process was killed by {name}"
    return short, LoadError(
        f"{short} {during}.{hint}",
        cause="process-killed",
        user_traceback=where,
    )


def _partial_run(
    watch: _Watch, short: str, stop: LoadError, seconds: float, timed_out: bool
) -> CheckRun:
    """The finished checks' results, the running one as "error", the others "skipped"."""
    assert watch.ids is not None
    results = list(watch.results)
    finished = {r.id for r in results}
    reason = NOT_RUN_REASON if timed_out else "not run: the check process ended"
    for check_id in watch.ids:
        if check_id in finished:
            continue
        if check_id == watch.running:
            ran = time.monotonic() - watch.running_since
            message = (
                f"timed out after {watch.job.timeout:g} s (--timeout; this check ran "
                f"{ran:.1f} s and was stopped)"
                if timed_out
                else f"{short} after {ran:.1f} s in this check"
            )
            results.append(CheckResult(check_id, "error", ran, message=message))
        else:
            results.append(CheckResult(check_id, "skipped", 0.0, message=reason))
    return CheckRun(
        results,
        seconds,
        meta=watch.meta,
        timed_out=DeadlineExceeded(watch.job.timeout or 0.0) if timed_out else None,
        timed_out_check=watch.running if timed_out else None,
        error=stop,
    )
