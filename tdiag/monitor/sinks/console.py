"""The live console: a progress bar with ETA on a terminal, a plain line per log step otherwise.

Renders only when the Monitor writes (log steps) and on Findings: nothing per training
step, no refresh thread. Everything goes to one injected ``rich.console.Console`` so the
output can be captured exactly in tests; the default console writes to stderr and honours
``NO_COLOR`` / ``FORCE_COLOR`` / ``TERM=dumb`` as rich does.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tdiag.findings import Finding, Severity
from tdiag.terminal import output_console

__all__ = ["ConsoleSink", "format_metrics"]

_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_MAX_OTHER_KEYS = 6  # a row with none of the headline metrics shows at most this many keys


def _as_float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f


def _num(x: float, spec: str) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _loss(x: float) -> str:
    return _num(x, ".4f" if x == 0 or 1e-3 <= abs(x) < 1e4 else ".3e")


def _si(x: float) -> str:
    if not math.isfinite(x):
        return _num(x, "")
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_metrics(metrics: Mapping[str, Any], *, mfu: bool = True) -> list[str]:
    """The compact fields shown for one row: loss, val loss, LR, grad norm, tokens/s, MFU, memory.

    Returns a list of ``"name value"`` strings (empty when the row has none of these). Memory
    is the GPU peak (else allocated) when present, else the process RSS; GB = 2**30 bytes.
    ``mfu=False`` leaves ``perf/mfu`` out (a CPU: see :meth:`ConsoleSink.open`).
    """
    fields: list[str] = []

    def get(key: str) -> float | None:
        return _as_float(metrics[key]) if key in metrics else None

    if (v := get("train/loss")) is not None:
        fields.append(f"loss {_loss(v)}")
    if (v := get("val/loss")) is not None:
        fields.append(f"val {_loss(v)}")
    if (v := get("train/lr")) is not None:
        fields.append(f"lr {_num(v, '.2e')}")
    if (v := get("train/grad_norm")) is not None:
        fields.append(f"gnorm {_num(v, '.3g')}")
    if (v := get("train/skipped_steps")) is not None and v > 0:  # GradScaler skipped steps
        fields.append(f"skipped {_num(v, '.0f')}")
    if (v := get("perf/tokens_per_sec")) is not None:
        fields.append(f"tok/s {_si(v)}")
    if mfu and (v := get("perf/mfu")) is not None:
        fields.append(f"mfu {_num(100 * v, '.1f')}%")
    gpu = get("sys/gpu_mem_peak_gb")
    if gpu is None:
        gpu = get("sys/gpu_mem_allocated_gb")
    if gpu is not None:
        fields.append(f"mem {_num(gpu, '.2f')} GB")
    elif (v := get("sys/rss_gb")) is not None:
        fields.append(f"rss {_num(v, '.2f')} GB")
    return fields


def _rate_text(steps_per_s: float) -> str:
    """``12.3 steps/s``, or ``4.2 s/step`` for slow steps (easier to read than 0.24)."""
    if steps_per_s >= 1:
        return f"{steps_per_s:.3g} steps/s"
    return f"{1 / steps_per_s:.3g} s/step"


def _other_fields(metrics: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in metrics.items():
        f = _as_float(value)
        out.append(f"{key} {_num(f, '.4g') if f is not None else value}")
        if len(out) == _MAX_OTHER_KEYS:
            if len(metrics) > _MAX_OTHER_KEYS:
                out.append("…")
            break
    return out


def _mfu_is_judged(meta: Mapping[str, Any]) -> bool:
    """False on a CPU without a ``peak_flops`` given: the MFU is then a ratio to this machine's
    own measured matmul (often 40–100 %), which the report labels as such and never judges;
    a live "mfu 98%" would read as a real utilisation. The history keeps ``perf/mfu``."""
    env = meta.get("environment") or {}
    monitor = meta.get("monitor") or {}
    on_cpu = str(env.get("device", "")).startswith("cpu")
    return not on_cpu or monitor.get("peak_flops") is not None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real stream
        return False


class _TwoLineProgress(Progress):
    """A progress bar with the latest metric line under it."""

    line: Text | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.line is not None:
            yield self.line


class ConsoleSink:
    """Show training progress and live Findings on a rich console.

    On a terminal: a progress bar (steps done / total, elapsed, ETA when ``total_steps`` is
    known) with a compact metric line under it, redrawn on log steps only; validation rows and
    Findings are printed above it. Elsewhere (a log file, a pipe, CI): one plain line per log
    step, ``step 120/1000 | loss 2.3100 | lr 3.00e-04 | … | eta 5m12s``.

    Args:
        total_steps: the number of steps, for the bar and the ETA (None: no ETA).
        quiet: print nothing except error-level Findings.
        console: where to render (default: ``Console(stderr=True)``, which respects NO_COLOR).
        clock: monotonic time source (tests inject a fake one for exact output).
        min_redraw_s: on a terminal, log steps closer together than this update the bar's
            state but do not redraw it (the next redraw, Finding or ``close`` shows it).
    """

    def __init__(
        self,
        total_steps: int | None = None,
        quiet: bool = False,
        console: Console | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_redraw_s: float = 0.25,
    ) -> None:
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0 or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.quiet = quiet
        self.console = console if console is not None else output_console(stderr=True)
        self._clock = clock
        self.min_redraw_s = min_redraw_s
        self._last_draw = -math.inf
        self._progress: _TwoLineProgress | None = None
        self._task: TaskID | None = None
        self._t_open: float | None = None
        self.outcome: str | None = None  # how the run ended, set by the Monitor before close
        self._first: tuple[int, float] | None = None  # (step, time) of the first write
        self._last_step: int | None = None
        self._shown: dict[str, Any] = {}
        self._explained: set[str] = set()  # Finding ids whose "tdiag explain" line was shown
        self._mfu = True  # decided in open(), from the run's device

    @property
    def interactive(self) -> bool:
        """True when a live progress bar is drawn (a real, non-dumb terminal)."""
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        self._t_open = self._clock()
        self._mfu = _mfu_is_judged(meta)
        if self.quiet:
            return
        self.console.print(Text(f"tdiag: monitoring into {run_dir}"), highlight=False)
        if self.interactive:
            columns: tuple[ProgressColumn | str, ...]
            if self.total_steps is not None:
                columns = (
                    TextColumn("step"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                )
            else:  # no total: a full bar and "30/?" would say nothing; a spinner and the rate
                columns = (
                    SpinnerColumn(),
                    TextColumn("step {task.completed:.0f}"),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[rate]}"),
                )
            self._progress = _TwoLineProgress(
                *columns,
                console=self.console,
                auto_refresh=False,  # no refresh thread: redraw on log steps only
                get_time=self._clock,
                # print() from the loop goes above the bar; but a piped stdout stays piped.
                redirect_stdout=_isatty(sys.stdout),
            )
            self._task = self._progress.add_task("train", total=self.total_steps, rate="")
            self._progress.start()

    def _rate(self, step: int, now: float) -> float | None:
        """Steps/s since the first log step (which skips the warm-up), or None."""
        if self._first is None:
            return None
        step0, t0 = self._first
        if step <= step0 or now <= t0:
            return None
        return (step - step0) / (now - t0)

    def _eta(self, step: int, now: float) -> str | None:
        rate = self._rate(step, now)
        if self.total_steps is None or rate is None:
            return None
        return _duration(max(0, self.total_steps - step) / rate)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.quiet:
            return
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        self._last_step = step
        fields = format_metrics(metrics, mfu=self._mfu) or _other_fields(metrics)
        progress = self._progress
        if progress is not None and self._task is not None:
            # The line under the bar keeps the latest value of each headline metric, so a
            # validation-only row adds "val …" instead of replacing the training numbers.
            self._shown.update(metrics)
            progress.line = Text(
                "  " + " | ".join(format_metrics(self._shown, mfu=self._mfu) or fields),
                no_wrap=True,  # the live area stays two lines on a narrow terminal
                overflow="ellipsis",
            )
            rate = self._rate(step, now)
            progress.update(
                self._task, completed=step, rate=f"{_rate_text(rate)}" if rate is not None else ""
            )
            if any(k.startswith("val/") for k in metrics):
                progress.console.print(Text(f"step {step} | " + " | ".join(fields)))
            elif now - self._last_draw < self.min_redraw_s:
                return  # fast log steps: a redraw (~0.5 ms) at most every min_redraw_s
            self._last_draw = now
            progress.refresh()
            return
        head = f"step {step}/{self.total_steps}" if self.total_steps is not None else f"step {step}"
        eta = self._eta(step, now)
        parts = [head, *fields] + ([f"eta {eta}"] if eta is not None else [])
        self.console.print(Text(" | ".join(parts)), soft_wrap=True, highlight=False)

    def event(self, finding: Finding) -> None:
        if finding.severity is Severity.INFO:
            return
        if self.quiet and finding.severity is not Severity.ERROR:
            return
        text = Text()
        text.append(finding.severity.value.upper(), style=_SEVERITY_STYLE[finding.severity])
        if finding.step is not None:
            text.append(f" step {finding.step}")
        text.append(f" [{finding.id}] ")
        text.append(finding.title, style="bold")
        if finding.where:
            text.append(f" at {finding.where}")
        if finding.message:
            text.append(f"\n  {finding.message}")
        if finding.recommendation:
            text.append(f"\n  -> {finding.recommendation}")
        if finding.id not in self._explained:  # the pointer once per id, not per repeat
            self._explained.add(finding.id)
            text.append(f"\n  more: tdiag explain {finding.id}", style="dim")
        console = self._progress.console if self._progress is not None else self.console
        console.print(text, soft_wrap=True, highlight=False)  # a live bar redraws under it

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.quiet or self._t_open is None:
            return
        elapsed = _duration(self._clock() - self._t_open)
        steps = f"{self._last_step} steps" if self._last_step is not None else "no log step"
        outcome = self.outcome or "done"
        self.console.print(Text(f"tdiag: {outcome}, {steps} in {elapsed}"), highlight=False)
        self._t_open = None
