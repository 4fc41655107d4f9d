"""MultiSink(background=True): TensorBoard/console/wandb in one writer thread, the history on
the caller's thread. Order kept, failures isolated, drained on close and at exit, bounded
when a sink is stuck, and a kill -9 loses no history row whose write had returned."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from tdiag.findings import Finding
from tdiag.history import read_history
from tdiag.monitor.sinks import ConsoleSink, JsonlSink, MultiSink, TensorBoardSink, WandbSink
from tdiag.monitor.sinks.background import SinkWorker, runs_in_background

ROOT = Path(__file__).resolve().parents[2]


class ThreadRecorder:
    """A sink that may run in the background and records each call with its thread."""

    background = True

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple] = []
        self.fail_at, self.delay = fail_at, delay

    def open(self, run_dir, meta):
        self.calls.append(("open", threading.current_thread().name))

    def write(self, step, metrics):
        if self.delay:
            time.sleep(self.delay)
        self.calls.append(("write", step, dict(metrics), threading.current_thread().name))
        if step == self.fail_at:
            raise OSError(28, "No space left on device")

    def event(self, finding):
        self.calls.append(("event", finding.step, threading.current_thread().name))

    def close(self):
        self.calls.append(("close", threading.current_thread().name))


def _finding(step):
    return Finding(id="train.nonfinite-loss", severity="error", title="NaN", step=step)


def test_which_sinks_run_in_the_background():
    assert runs_in_background(TensorBoardSink()) and runs_in_background(WandbSink())
    with open(os.devnull, "w") as devnull:
        assert runs_in_background(ConsoleSink(console=Console(file=devnull)))
    assert not runs_in_background(JsonlSink())
    assert not runs_in_background(object())  # an unknown user sink stays on the caller's thread


def test_background_calls_run_in_order_in_one_thread_and_close_drains(tmp_path):
    bg = ThreadRecorder(delay=0.0005)
    multi = MultiSink([JsonlSink(), bg], background=True)
    multi.open(tmp_path, {})
    row = {"train/loss": 1.0}
    for step in range(1, 301):
        row["train/loss"] = float(step)
        multi.write(step, row)  # the same dict, changed after each call: the sink saw copies
        if step % 100 == 0:
            multi.event(_finding(step))
    # the history is written at once, on this thread
    df, _ = read_history(tmp_path)
    assert df["step"].tolist() == list(range(1, 301))
    multi.close()
    names = {c[-1] for c in bg.calls[1:]}
    assert bg.calls[0] == ("open", threading.current_thread().name)
    assert names == {"tdiag-sink-writer"}
    kinds = [(c[0], c[1]) for c in bg.calls[1:-1]]
    expect = []
    for step in range(1, 301):
        expect.append(("write", step))
        if step % 100 == 0:
            expect.append(("event", step))
    assert kinds == expect
    assert [c[2]["train/loss"] for c in bg.calls if c[0] == "write"] == [
        float(s) for s in range(1, 301)
    ]
    assert bg.calls[-1][0] == "close"
    assert not [t for t in threading.enumerate() if t.name == "tdiag-sink-writer"]


def test_a_failing_background_sink_is_disabled_once_and_the_others_go_on(tmp_path, caplog):
    bad, good = ThreadRecorder(fail_at=3), ThreadRecorder()
    multi = MultiSink([bad, good], background=True)
    multi.open(tmp_path, {})
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.sinks.base"):
        for step in range(1, 11):
            multi.write(step, {"a": 1.0})
        assert multi.flush(timeout=10)
        assert [f.phase for f in multi.failures] == ["write"]
        multi.close()
    assert [c[1] for c in bad.calls if c[0] == "write"] == [1, 2, 3]
    assert [c[1] for c in good.calls if c[0] == "write"] == list(range(1, 11))
    assert len([r for r in caplog.records if "sink failed" in r.getMessage()]) == 1


def test_without_background_everything_runs_on_the_callers_thread(tmp_path):
    bg = ThreadRecorder()
    multi = MultiSink([bg])
    multi.open(tmp_path, {})
    multi.write(1, {"a": 1.0})
    assert bg.calls[-1][-1] == threading.current_thread().name  # done when write returned
    multi.close()


def test_a_stuck_sink_neither_grows_memory_nor_holds_training_or_the_exit(caplog):
    release = threading.Event()
    calls = []

    def stuck(phase, args):
        calls.append(args[0])
        release.wait(30)

    worker = SinkWorker(stuck, maxsize=4, stall_s=0.2)
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.sinks.background"):
        t0 = time.monotonic()
        accepted = [worker.submit("write", (i,)) for i in range(50)]
        elapsed = time.monotonic() - t0
    # 1 running + 4 queued accepted; one wait of stall_s, then the rest dropped at once
    assert sum(accepted) <= 6 and worker.dropped >= 44
    assert elapsed < 2.0
    assert len([r for r in caplog.records if "made no progress" in r.getMessage()]) == 1
    t0 = time.monotonic()
    assert worker.stop(timeout=0.3) is False  # a stuck sink: close gives up, does not hang
    assert time.monotonic() - t0 < 1.5
    release.set()
    assert worker.stop(timeout=10) is True
    assert calls == list(range(len(calls)))  # what ran, ran in order


def test_multisink_close_gives_up_on_a_stuck_sink_within_its_timeout(tmp_path, caplog):
    slow = ThreadRecorder(delay=0.5)
    multi = MultiSink([slow], background=True, drain_timeout_s=0.2)
    multi.open(tmp_path, {})
    for step in range(20):
        multi.write(step, {"a": 1.0})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.sinks.base"):
        multi.close()
    assert time.monotonic() - t0 < 1.5
    assert "did not finish within 0.2 s" in caplog.text


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from tdiag.monitor.sinks import JsonlSink, MultiSink, TensorBoardSink
    multi = MultiSink([JsonlSink(), TensorBoardSink()], background=True)
    multi.open({run!r}, {{}})
    for step in range(1, 10**9):
        multi.write(step, {{"train/loss": 1.0 / step, "train/lr": 1e-3}})
        print(step, flush=True)  # after write() returned
        {after}
    """
)


def _child(tmp_path: Path, after: str) -> subprocess.Popen:
    code = _CHILD.format(root=str(ROOT), run=str(tmp_path / "run"), after=after)
    with open(tmp_path / "stderr.txt", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True
        )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_loses_no_history_row_whose_write_returned(tmp_path, seed):
    """A real SIGKILL at a random moment (seeded delay): every step the child printed (its
    write() had returned) is in history.jsonl, in order; at most the line in flight is cut."""
    import random

    proc = _child(tmp_path, "time.sleep(0.0005)")
    first = proc.stdout.readline()
    assert first.strip() == "1", (tmp_path / "stderr.txt").read_text()
    time.sleep(0.2 + random.Random(seed).random() * 0.5)
    proc.send_signal(signal.SIGKILL)
    with proc.stdout:
        out = proc.stdout.read()  # the same buffered reader as readline(): nothing skipped
    proc.wait(timeout=30)
    printed = [int(x) for x in (first + out).split()]
    assert proc.returncode == -signal.SIGKILL and len(printed) > 10
    df, stats = read_history(tmp_path / "run")
    steps = df["step"].tolist()
    assert steps[: len(printed)] == printed  # every returned write is on disk, in order
    assert len(steps) - len(printed) <= 1  # at most the row whose print was cut off
    assert stats.garbage <= 1  # at most the line in flight (torn)


@pytest.mark.slow
def test_queued_rows_are_written_at_interpreter_exit_without_close(tmp_path):
    """A script that never closes its sinks: the writer thread is a daemon, yet the queued
    TensorBoard rows are flushed at exit (atexit), not lost."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tdiag.monitor.sinks import MultiSink, TensorBoardSink

        class Slow(TensorBoardSink):
            def write(self, step, metrics):
                time.sleep(0.002)
                super().write(step, metrics)

        multi = MultiSink([Slow()], background=True)
        multi.open({str(tmp_path)!r}, {{}})
        for step in range(1, 501):
            multi.write(step, {{"train/loss": float(step)}})
        print(multi._worker.pending, flush=True)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[0]) > 100  # rows were still queued when the script ended
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 501))


def test_monitor_sends_tensorboard_and_console_to_the_writer_thread(tmp_path):
    import torch

    from tdiag import Monitor

    seen = ThreadRecorder()
    model = torch.nn.Linear(2, 2)
    with Monitor(model, run_dir=tmp_path, report=False, system=False, console=False,
                 sinks=[seen]) as mon:  # fmt: skip
        for _ in range(3):
            mon.log({"val/loss": 1.0})
        names = {type(s).__name__ for s in (mon.sinks.sinks[i] for i in mon.sinks._later)}
    assert names == {"TensorBoardSink", "ThreadRecorder"}
    assert {c[-1] for c in seen.calls if c[0] == "write"} == {"tdiag-sink-writer"}
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])["val/loss"] == 1.0


def test_an_exception_in_the_loop_still_drains_the_writer_thread(tmp_path):
    """A loop that raises inside the Monitor's block: every row it logged reaches the
    background sink (queued behind a slow sink when the exception came), then close."""
    import torch

    from tdiag import Monitor

    slow = ThreadRecorder(delay=0.002)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="loader broke"), Monitor(
        model, run_dir=tmp_path, report=False, system=False, console=False,
        tensorboard=False, sinks=[slow],
    ) as mon:  # fmt: skip
        for i in range(200):
            mon.log({"val/loss": float(i)}, step=i)
        assert mon.sinks._worker.pending > 50  # still queued when the loop fails
        raise ValueError("loader broke")
    written = [c[2]["val/loss"] for c in slow.calls if c[0] == "write"]
    assert written == [float(i) for i in range(200)]
    assert slow.calls[-1][0] == "close"
