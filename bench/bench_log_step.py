"""What one log step costs the training thread in the sinks, side by side.

Every step logs one row of ``--metrics`` metrics (floats, a fresh set of values each step,
prepared before timing). Configurations, interleaved over ``--rounds`` rounds in a rotated
order, a fresh run folder each:

- ``sinks``: ``MultiSink.write`` alone (what the Monitor calls on a log step):
  ``default sync`` = history + TensorBoard + console, all on the calling thread (tdiag before
  the background writer); ``default`` = the same with ``background=True`` (TensorBoard and
  the console in the writer thread, as the Monitor runs them now); ``jsonl`` = the history
  alone; ``none`` = no sink.
- ``monitor``: ``Monitor.log(row)`` on a tiny model (the public path: float conversion, the
  flight recorder, the sinks) with the Monitor's defaults, with ``tensorboard=False,
  console=False`` (history only), and with no sink at all.

Measured per log step: the calling (training) thread's CPU time (``time.thread_time``), its
wall time, and the process's CPU time over the loop plus ``close`` (so the writer thread's
and any other thread's work, and the drain, are counted; with ``--work-us`` it includes the sleeps' small CPU). The
console renders plain lines
(a log file, a pipe: what torchrun and Slurm give) into /dev/null.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_log_step.py --steps 20000 --rounds 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_log_step.py --steps 20000 --rounds 3 --work-us 1000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from tdiag.monitor.sinks import ConsoleSink, JsonlSink, MultiSink, TensorBoardSink  # noqa: E402

N_ROWS = 1000  # distinct prepared rows, cycled


def rows(n_metrics: int) -> list[dict[str, float]]:
    rng = random.Random(0)
    names = ["train/loss", "train/lr", "train/grad_norm", "perf/step_time"]
    names += [f"grad_norm/blocks.{i // 4}.p{i % 4}" for i in range(n_metrics - len(names))]
    return [{k: rng.random() for k in names[:n_metrics]} for _ in range(N_ROWS)]


def _sinks(config: str, devnull) -> tuple[list, bool]:
    console = ConsoleSink(console=Console(file=devnull, width=200))
    return {
        "default sync": ([JsonlSink(), TensorBoardSink(), console], False),
        "default": ([JsonlSink(), TensorBoardSink(), console], True),
        "jsonl": ([JsonlSink()], True),
        "none": ([], True),
    }[config]


def run_sinks(config: str, folder: Path, data: list[dict[str, float]], steps: int) -> dict:
    with open(os.devnull, "w") as devnull:
        sinks, background = _sinks(config, devnull)
        multi = MultiSink(sinks, background=background)
        multi.open(folder, {})
        p0 = time.process_time()
        thread, wall = _loop(lambda step: multi.write(step, data[step % N_ROWS]), steps)
        multi.close()
        p1 = time.process_time()
    assert not multi.failures, multi.failures
    return _result(steps, thread, wall, p1 - p0)


WORK_S = 0.0  # --work-us: the training step between log steps (set in main)


def _loop(log: Callable[[int], None], steps: int) -> tuple[float, float]:
    """Call ``log(step)`` ``steps`` times; the training thread's CPU and wall time in it.

    With ``WORK_S``, a sleep between calls stands for the training step (it releases the GIL,
    as the forward/backward kernels do) and each call is timed on its own."""
    if not WORK_S:
        t0, w0 = time.thread_time(), time.perf_counter()
        for step in range(1, steps + 1):
            log(step)
        return time.thread_time() - t0, time.perf_counter() - w0
    thread = wall = 0.0
    tt, pc, sleep = time.thread_time, time.perf_counter, time.sleep
    for step in range(1, steps + 1):
        sleep(WORK_S)
        t0, w0 = tt(), pc()
        log(step)
        wall += pc() - w0
        thread += tt() - t0
    return thread, wall


def run_monitor(config: str, folder: Path, data: list[dict[str, float]], steps: int) -> dict:
    import torch

    from tdiag import Monitor

    options = {
        "default": {},
        "jsonl": {"tensorboard": False, "console": False},
        "none": {"tensorboard": False, "console": False},
    }[config]
    model = torch.nn.Linear(4, 4)
    saved = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull  # the default console writes plain lines to stderr
        try:
            mon = Monitor(model, run_dir=folder, report=False, system=False, **options)
            if config == "none":  # no sink at all: what the Monitor does besides the sinks
                mon.sinks.close()
                mon.sinks = MultiSink([])
            p0 = time.process_time()
            thread, wall = _loop(lambda step: mon.log(data[step % N_ROWS], step=step), steps)
            mon.close()
            p1 = time.process_time()
        finally:
            sys.stderr = saved
    return _result(steps, thread, wall, p1 - p0)


def _result(steps: int, thread: float, wall: float, process: float) -> dict:
    us = 1e6 / steps
    return {"thread_us": thread * us, "wall_us": wall * us, "cpu_us": process * us}


def bench(
    name: str,
    fn: Callable[[str, Path, list, int], dict],
    configs: list[str],
    args: argparse.Namespace,
) -> None:
    data = rows(args.metrics)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    base = Path(tempfile.mkdtemp(prefix="tdiag-bench-log-step-"))
    try:
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                folder = base / f"{name}-{config.replace(' ', '-')}-{r}"
                results[config].append(fn(config, folder, data, args.steps))
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"\n{name}: {args.steps} log steps x {args.metrics} metrics, {args.rounds} round(s), "
        f"{args.work_us:g} µs of training step between log steps"
    )
    print(
        f"{'config':>14} | {'thread CPU µs':>13} | {'thread wall µs':>14} | {'process CPU µs':>14}"
    )
    for config in configs:
        res = results[config]

        def med(key: str, res: list[dict] = res) -> str:
            vals = [x[key] for x in res]
            lo, hi = min(vals), max(vals)
            return f"{statistics.median(vals):6.1f} ({lo:.0f}–{hi:.0f})"

        print(f"{config:>14} | {med('thread_us'):>13} | {med('wall_us'):>14} | {med('cpu_us'):>14}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--metrics", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["sinks", "monitor"], default=None)
    ap.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="a GIL-free pause between log steps standing for the training step (µs)",
    )
    args = ap.parse_args()
    global WORK_S
    WORK_S = args.work_us * 1e-6
    print(f"python {sys.version.split()[0]}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.only in (None, "sinks"):
        bench("sinks", run_sinks, ["default sync", "default", "jsonl", "none"], args)
    if args.only in (None, "monitor"):
        bench("monitor", run_monitor, ["default", "jsonl", "none"], args)


if __name__ == "__main__":
    main()
