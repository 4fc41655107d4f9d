"""ConsoleSink: golden output on a fixed-width console, TTY progress bar, quiet mode, NO_COLOR."""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import pytest
from rich.console import Console

from tdiag.findings import Finding
from tdiag.monitor.sinks.console import ConsoleSink, format_metrics

ROW = {
    "train/loss": 2.3125,
    "train/lr": 3e-4,
    "train/grad_norm": 1.234,
    "perf/tokens_per_sec": 12345.6,
    "perf/mfu": 0.4123,
    "sys/gpu_mem_peak_gb": 3.2109,
    "sys/gpu_mem_allocated_gb": 1.0,
    "grad_norm/blocks.0.mlp": 0.5,  # per-layer metrics are not shown
}

ERROR = Finding(
    id="train.nonfinite_loss",
    severity="error",
    title="Loss became NaN",
    message="loss was NaN [bold]at[/bold] step 30",  # markup must print literally
    where="blocks.1.attn",
    step=30,
    recommendation="lower the learning rate",
)
WARNING = Finding(id="perf.data_bound", severity="warning", title="Data loading is slow", step=20)
INFO = Finding(id="perf.note", severity="info", title="just so you know", step=20)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    console = Console(
        file=buf, width=100, force_terminal=terminal, color_system=None, legacy_windows=False
    )
    return console, buf


def _run(sink: ConsoleSink, clock: FakeClock) -> None:
    sink.open(Path("runs/demo"), {})
    for step in (10, 20, 30):
        clock.t += 5
        sink.write(step, {**ROW, "train/loss": ROW["train/loss"] - step / 100})
        if step == 20:
            sink.event(WARNING)
            sink.event(INFO)
    sink.write(30, {"val/loss": 2.1})
    sink.event(ERROR)
    clock.t += 1
    sink.close()


GOLDEN_PLAIN = """\
tdiag: monitoring into runs/demo
step 10/100 | loss 2.2125 | lr 3.00e-04 | gnorm 1.23 | tok/s 12.35k | mfu 41.2% | mem 3.21 GB
step 20/100 | loss 2.1125 | lr 3.00e-04 | gnorm 1.23 | tok/s 12.35k | mfu 41.2% | mem 3.21 GB | eta 40s
WARNING step 20 [perf.data_bound] Data loading is slow
  more: tdiag explain perf.data_bound
step 30/100 | loss 2.0125 | lr 3.00e-04 | gnorm 1.23 | tok/s 12.35k | mfu 41.2% | mem 3.21 GB | eta 35s
step 30/100 | val 2.1000 | eta 35s
ERROR step 30 [train.nonfinite_loss] Loss became NaN at blocks.1.attn
  loss was NaN [bold]at[/bold] step 30
  -> lower the learning rate
  more: tdiag explain train.nonfinite_loss
tdiag: done, 30 steps in 16s
"""


def test_plain_output_golden():
    console, buf = _console(terminal=False)
    clock = FakeClock()
    _run(ConsoleSink(total_steps=100, console=console, clock=clock), clock)
    assert buf.getvalue() == GOLDEN_PLAIN


def test_plain_lines_do_not_wrap_at_console_width():
    console, buf = _console(terminal=False)
    console.width = 40  # a log file: one record per line, whatever the width
    sink = ConsoleSink(console=console, clock=FakeClock())
    sink.open(Path("r"), {})
    sink.write(7, ROW)
    lines = buf.getvalue().splitlines()
    assert lines[1].startswith("step 7 | loss 2.3125 | lr 3.00e-04") and lines[1].endswith("GB")
    assert "eta" not in lines[1]  # no ETA without total_steps


def test_quiet_prints_only_error_findings():
    console, buf = _console(terminal=False)
    clock = FakeClock()
    _run(ConsoleSink(total_steps=100, quiet=True, console=console, clock=clock), clock)
    assert buf.getvalue() == (
        "ERROR step 30 [train.nonfinite_loss] Loss became NaN at blocks.1.attn\n"
        "  loss was NaN [bold]at[/bold] step 30\n"
        "  -> lower the learning rate\n"
        "  more: tdiag explain train.nonfinite_loss\n"
    )


def test_terminal_shows_progress_bar_eta_and_metric_line():
    console, buf = _console(terminal=True)
    clock = FakeClock()
    threads_before = threading.active_count()
    sink = ConsoleSink(total_steps=100, console=console, clock=clock)
    sink.open(Path("runs/demo"), {})
    assert sink.interactive
    assert threading.active_count() == threads_before  # no auto-refresh thread
    clock.t += 5
    sink.write(10, ROW)
    clock.t += 5
    sink.write(20, ROW)
    out = buf.getvalue()
    assert "20/100" in out and "eta 0:00:40" in out and "━" in out
    assert (
        "  loss 2.3125 | lr 3.00e-04 | gnorm 1.23 | tok/s 12.35k | mfu 41.2% | mem 3.21 GB" in out
    )
    # Nothing is redrawn between log steps.
    clock.t += 50
    assert buf.getvalue() == out
    sink.write(30, {"val/loss": 2.5})  # printed above the bar, merged into the line
    out = buf.getvalue()
    assert "step 30 | val 2.5000\n" in out
    assert "loss 2.3125 | val 2.5000 | lr 3.00e-04" in out
    sink.event(ERROR)
    sink.close()
    out = buf.getvalue()
    assert "ERROR step 30 [train.nonfinite_loss] Loss became NaN" in out
    assert out.endswith("tdiag: done, 30 steps in 1m00s\n")


def test_terminal_without_total_has_no_eta_value():
    console, buf = _console(terminal=True)
    clock = FakeClock()
    sink = ConsoleSink(console=console, clock=clock)
    sink.open(Path("r"), {})
    clock.t += 1
    sink.write(5, {"train/loss": 1.0})
    sink.close()
    out = buf.getvalue()
    assert "step 5" in out and "eta" not in out


def test_terminal_without_total_shows_a_spinner_and_the_rate_not_a_full_bar():
    console, buf = _console(terminal=True)
    clock = FakeClock()
    sink = ConsoleSink(console=console, clock=clock, min_redraw_s=0)
    sink.open(Path("r"), {})
    sink.write(10, {"train/loss": 1.0})
    clock.t += 4
    sink.write(30, {"train/loss": 0.9})  # 20 steps in 4 s
    out = buf.getvalue()
    assert "step 30" in out and "5 steps/s" in out
    assert "30/?" not in out and "━" not in out  # no bar drawn full for an unknown total
    assert any(ch in out for ch in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # rich's "dots" spinner
    clock.t += 100
    sink.write(40, {"train/loss": 0.8})  # now slower than a step a second on average
    assert "3.47 s/step" in buf.getvalue()  # 30 steps in 104 s
    sink.close()


def test_terminal_with_total_keeps_the_bar():
    console, buf = _console(terminal=True)
    sink = ConsoleSink(total_steps=50, console=console, clock=FakeClock())
    sink.open(Path("r"), {})
    sink.write(25, {"train/loss": 1.0})
    sink.close()
    assert "25/50" in buf.getvalue() and "━" in buf.getvalue()


def test_no_color_env_is_respected(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert ConsoleSink().console.no_color
    buf = io.StringIO()
    colored = Console(file=buf, force_terminal=True, color_system="truecolor", width=100)
    ConsoleSink(console=colored).event(ERROR)
    assert "\x1b[31m" not in buf.getvalue() and "\x1b[1;31m" not in buf.getvalue()
    assert "ERROR" in buf.getvalue()


def test_colors_when_allowed(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    colored = Console(file=buf, force_terminal=True, color_system="standard", width=100)
    ConsoleSink(console=colored).event(ERROR)
    assert "\x1b[1;31mERROR" in buf.getvalue()


def test_default_console_writes_to_stderr():
    assert ConsoleSink().console.stderr


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"train/loss": math.nan}, ["loss nan"]),
        ({"train/loss": math.inf, "train/lr": 0.0}, ["loss inf", "lr 0.00e+00"]),
        ({"train/loss": 123456.0}, ["loss 1.235e+05"]),
        ({"perf/tokens_per_sec": 999.4}, ["tok/s 999"]),
        ({"perf/tokens_per_sec": 2.5e6}, ["tok/s 2.50M"]),
        ({"sys/gpu_mem_allocated_gb": 1.5, "sys/rss_gb": 9.0}, ["mem 1.50 GB"]),
        ({"sys/rss_gb": 9.0}, ["rss 9.00 GB"]),
        ({"grad_norm/x": 1.0}, []),
    ],
)
def test_format_metrics(row, expected):
    assert format_metrics(row) == expected


def test_rows_without_headline_metrics_show_their_keys():
    console, buf = _console(terminal=False)
    sink = ConsoleSink(console=console, clock=FakeClock())
    sink.open(Path("r"), {})
    sink.write(3, {"my/acc": 0.91234, "note": "hello"})
    sink.write(4, {f"k{i}": float(i) for i in range(8)})
    lines = buf.getvalue().splitlines()
    assert lines[1] == "step 3 | my/acc 0.9123 | note hello"
    assert lines[2] == "step 4 | k0 0 | k1 1 | k2 2 | k3 3 | k4 4 | k5 5 | …"


def test_negative_total_is_rejected():
    with pytest.raises(ValueError, match="-1"):
        ConsoleSink(total_steps=-1)


def test_terminal_redraws_at_most_every_min_redraw_s():
    console, buf = _console(terminal=True)
    clock = FakeClock()
    sink = ConsoleSink(total_steps=100, console=console, clock=clock, min_redraw_s=0.25)
    sink.open(Path("r"), {})
    clock.t += 1
    sink.write(10, {"train/loss": 3.0})
    drawn = buf.getvalue()
    assert "loss 3.0000" in drawn
    clock.t += 0.1  # fast log steps: state updated, no redraw
    sink.write(20, {"train/loss": 2.0})
    assert buf.getvalue() == drawn
    clock.t += 0.2
    sink.write(30, {"train/loss": 1.0})
    assert "loss 1.0000" in buf.getvalue() and "30/100" in buf.getvalue()
    sink.close()


def test_terminal_metric_line_is_cut_not_wrapped_on_a_narrow_terminal():
    buf = io.StringIO()
    console = Console(file=buf, width=40, force_terminal=True, color_system=None)
    clock = FakeClock()
    sink = ConsoleSink(total_steps=100, console=console, clock=clock)
    sink.open(Path("r"), {})
    clock.t += 1
    sink.write(10, ROW)
    sink.close()
    lines = [line.split("\r")[-1] for line in buf.getvalue().split("\n")]
    metric_lines = [line for line in lines if "loss" in line]
    assert metric_lines and all(line.rstrip().endswith("…") for line in metric_lines)
    assert all(len(line) <= 40 for line in metric_lines)


def test_the_last_line_says_how_the_run_ended(tmp_path):
    import contextlib
    import io

    import pytest
    import torch
    from rich.console import Console

    from tdiag.monitor import Monitor
    from tdiag.monitor.sinks import ConsoleSink

    from .conftest import TinyGPT, quiet_options

    def last_line(exc: BaseException | None) -> str:
        buf = io.StringIO()
        sink = ConsoleSink(console=Console(file=buf, width=200, color_system=None))
        opts = quiet_options(tmp_path / str(exc is None))
        expect = pytest.raises(RuntimeError) if exc else contextlib.nullcontext()
        with expect, Monitor(TinyGPT(), sinks=[sink], **opts) as mon:
            mon.step(torch.tensor(1.0))
            if exc:
                raise exc
        return buf.getvalue().strip().splitlines()[-1]

    assert last_line(None).startswith("tdiag: done, 1 steps in")
    assert last_line(RuntimeError("out of memory")).startswith(
        "tdiag: failed with RuntimeError: out of memory, 1 steps in"
    )


def test_cpu_mfu_against_a_measured_matmul_is_not_shown_live():
    row = {"train/loss": 1.0, "perf/mfu": 0.98}
    for meta, shown in (
        ({"environment": {"device": "cpu"}, "monitor": {"peak_flops": None}}, False),
        ({"environment": {"device": "cpu"}, "monitor": {"peak_flops": 1e12}}, True),  # given
        ({"environment": {"device": "cuda:0"}, "monitor": {}}, True),
    ):
        console, buf = _console(terminal=False)
        sink = ConsoleSink(console=console, clock=FakeClock())
        sink.open(Path("r"), meta)
        sink.write(1, row)
        assert ("mfu 98.0%" in buf.getvalue()) is shown, meta


def test_a_finding_points_at_tdiag_explain_once_per_id():
    console, buf = _console(terminal=False)
    sink = ConsoleSink(console=console, clock=FakeClock())
    sink.open(Path("r"), {})
    sink.event(WARNING)
    sink.event(ERROR)
    sink.event(WARNING)  # a repeat: the finding again, not the pointer
    out = buf.getvalue()
    assert out.count("WARNING step 20 [perf.data_bound]") == 2
    assert out.count("more: tdiag explain perf.data_bound") == 1
    assert out.count("more: tdiag explain train.nonfinite_loss") == 1
