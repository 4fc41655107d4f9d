"""SIGTERM/SIGINT: the handler only sets a flag; the Monitor flushes, writes the report and
the process exits 143/130 within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent

WORKER = """
import sys, time, torch
sys.path.insert(0, {here!r})
from conftest import TinyGPT, make_batch, lm_loss
from tdiag import Monitor

run_dir, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = TinyGPT()
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
with Monitor(model, opt, run_dir=run_dir, log_every=1000, console=False, tensorboard=False,
             system=False, report=True) as mon:
    for step in range(1, 100000):
        ids = make_batch(step)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss, tokens=ids.numel())
        if step == 3:
            print("ready", flush=True)
        if mode == "cooperative" and mon.stop_requested:
            print("stopping at", step, flush=True)
            break
        time.sleep(0.01)
print("not reached in ignore mode", flush=True)
"""


def run_and_signal(
    tmp_path: Path, mode: str, sig: int
) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "sig", "code"),
    [
        ("cooperative", signal.SIGTERM, 143),
        ("ignore", signal.SIGINT, 130),
    ],
)
def test_signal_flushes_reports_and_exits(tmp_path, mode, sig, code):
    result, seconds = run_and_signal(tmp_path, mode, sig)
    assert result.returncode == code, result.stderr
    assert seconds < 20  # well inside torchrun's 30 s before SIGKILL (report included)
    assert "not reached" not in result.stdout
    if mode == "cooperative":
        assert "stopping at" in result.stdout
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] >= 3  # pending steps flushed
    assert "train/loss" in rows[-1]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["end"]["status"] == "signal"
    assert (run / "report.json").exists()
    assert "Traceback" not in result.stderr


DEFAULT_SINKS_WORKER = """
import sys, time, torch
sys.path.insert(0, {here!r})
from conftest import TinyGPT, make_batch, lm_loss
from tdiag import Monitor

torch.set_num_threads(1)
model = TinyGPT()
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
# Default sinks (history, TensorBoard, console; the last two in the background writer
# thread), logging every step: the writer's queue holds rows when the signal comes.
with Monitor(model, opt, run_dir=sys.argv[1], log_every=1, system=False, report=False) as mon:
    for step in range(1, 100000):
        ids = make_batch(step)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss, tokens=ids.numel())
        mon.log({{f"extra/m{{i}}": float(step + i) for i in range(50)}})
        if step == 20:
            print("ready", flush=True)
        if mon.stop_requested:
            break
"""


@pytest.mark.slow
def test_sigterm_drains_the_background_sinks_before_the_exit(tmp_path):
    """After SIGTERM the rows queued for TensorBoard and the console are written before the
    process exits 143: TensorBoard has every step of the history, the console's last line
    says how the run ended."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(DEFAULT_SINKS_WORKER.format(here=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 143, err
    assert seconds < 10 and "Traceback" not in err
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows if "train/loss" in r})
    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == steps
    extra = sorted({r["step"] for r in rows if "extra/m49" in r})
    assert [e.step for e in acc.Scalars("extra/m49")] == extra and len(extra) >= 20
    assert err.rstrip().splitlines()[-1].startswith("tdiag: terminated by SIGTERM")
