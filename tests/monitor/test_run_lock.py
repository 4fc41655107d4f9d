"""One writer per run folder, and how a run ended, from outside: real processes, real
signals (kill -9, SIGTERM), a second writer refused (tdiag/runlock.py, report/run_status.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tdiag.monitor import Monitor
from tdiag.report import build_report
from tdiag.runlock import RunDirInUse, lock_holder

from .conftest import TinyGPT, lm_loss, make_batch, quiet_options

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from monitor.conftest import TinyGPT, lm_loss, make_batch
    from tdiag import Monitor
    import tdiag.monitor.monitor
    {pre}
    torch.set_num_threads(1)
    model = TinyGPT(); opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, run_dir={run_dir!r}, log_every=1, console=False,
                  tensorboard=False, system=False, report={report!r})
    for step in range(1, {steps} + 1):
        ids = make_batch(step)
        lm_loss(model(ids), ids).backward(); opt.step(); opt.zero_grad()
        mon.step(torch.tensor(1.0), tokens=ids.numel())
        if step == {ready_at}:
            open({ready!r}, "w").close()
        if mon.stop_requested:
            break
        time.sleep({sleep})
    mon.close()
    """
)


def _start_writer(tmp_path, run_dir, *, steps=1000, ready_at=3, sleep=0.05, report=False, pre=""):
    ready = tmp_path / "ready"
    code = WRITER.format(
        tests=str(ROOT / "tests"),
        run_dir=str(run_dir),
        report=report,
        steps=steps,
        ready_at=ready_at,
        sleep=sleep,
        ready=str(ready),
        pre=pre,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the writer did not start (rc {proc.poll()})")
        time.sleep(0.05)
    return proc


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_run_is_marked(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_writer(tmp_path, run_dir)
    try:
        holder = lock_holder(run_dir)
        assert holder is not None and holder["pid"] == proc.pid
        model = TinyGPT()
        hooks_before = len(model._forward_pre_hooks)
        with pytest.raises(RunDirInUse, match=rf"process {proc.pid}"):
            Monitor(model, torch.optim.SGD(model.parameters(), lr=1e-2), run_dir=run_dir)
        assert len(model._forward_pre_hooks) == hooks_before  # refused before any hook
        report = build_report(run_dir)
        assert report["summary"]["run_status"]["state"] == "running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    written = _rows(run_dir)
    assert len(written) >= 3 and written[0]["step"] == 1  # the first writer's rows are whole
    assert lock_holder(run_dir) is None  # the kernel dropped the lock with the process
    status = build_report(run_dir)["summary"]["run_status"]
    assert status["state"] == "ended-without-closing"
    assert status["step"] == written[-1]["step"]
    assert "crashed or killed" in status["text"]
    html = (run_dir / "report.html").read_text()
    assert "Ended without closing (crashed or killed) after step" in html
    # after the kill, the folder can be written again (a resume)
    model = TinyGPT()
    with Monitor(model, **quiet_options(tmp_path, run_dir=run_dir)) as mon:
        mon.step(torch.tensor(1.0))


@pytest.mark.slow
def test_sigterm_is_reported_as_terminated_at_its_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_writer(tmp_path, run_dir, report=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["end"]["status"] == "signal" and meta["end"]["signal"] == "SIGTERM"
    status = json.loads((run_dir / "report.json").read_text())["summary"]["run_status"]
    assert status["state"] == "terminated"
    assert status["text"] == f"Terminated by SIGTERM at step {meta['end']['steps']}."


def test_an_exception_and_a_normal_end_are_reported_in_words(tmp_path):
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError), Monitor(model, opt, **quiet_options(tmp_path / "a")) as mon:
        for step in range(1, 4):
            ids = make_batch(step)
            lm_loss(model(ids), ids).backward()
            opt.step()
            opt.zero_grad()
            mon.step(torch.tensor(1.0))
        raise ValueError("the data loader broke")
    status = build_report(tmp_path / "a" / "run")["summary"]["run_status"]
    assert status == {
        "state": "failed",
        "step": 3,
        "text": "Failed with ValueError: the data loader broke at step 3.",
    }
    with Monitor(model, opt, **quiet_options(tmp_path / "b")) as mon:
        mon.step(torch.tensor(1.0))
    status = build_report(tmp_path / "b" / "run")["summary"]["run_status"]
    assert status["state"] == "completed" and status["text"] == "Completed after step 1."


@pytest.mark.slow
def test_after_sigterm_an_unfinished_report_is_left_to_tdiag_report(tmp_path):
    # A report that cannot be built within the budget after the signal (here: a budget of 0)
    # is not waited for: meta.json says so, the process exits 143 at once.
    run_dir = tmp_path / "run"
    pre = "tdiag.monitor.monitor.SIGNAL_REPORT_BUDGET_S = 0.0"
    proc = _start_writer(tmp_path, run_dir, report=True, pre=pre)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    end = json.loads((run_dir / "meta.json").read_text())["end"]
    assert end["status"] == "signal" and end["signal"] == "SIGTERM"
    assert end["report"].startswith("incomplete") and "tdiag report" in end["report"]
    assert len(_rows(run_dir)) >= 3  # the history is whole
