"""Time from SIGTERM to process exit for a monitored run whose history is long.

A run folder is prefilled with ``--rows`` history rows (the size of a long run), then a
small training loop with the Monitor (defaults: history, TensorBoard, report on close)
appends to it; once it is training, it gets SIGTERM. Measured: seconds from the signal to
the process's exit, its exit code, meta.json's end block (status, signal, whether the report
was finished), and whether report.json exists.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sigterm_exit.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOOP = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from reference_model.config import ModelConfig
    from reference_model.model import Transformer
    from tdiag import Monitor
    torch.set_num_threads(1)
    model = Transformer(ModelConfig(vocab_size=257, d_model=64, n_heads=2, n_layers=2,
                                    max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, run_dir={run_dir!r}, log_every=10, console=False, system=False, report={report!r})
    for step in range(1, 100000):
        ids = torch.randint(0, 256, (4, 64))
        loss = model(ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
        mon.step(loss, tokens=ids.numel())
        if step == 20:
            open({ready!r}, "w").close()
        if mon.stop_requested:
            break
    mon.close()
    """
)


def prefill(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for step in range(1, rows + 1):
            loss = 5.0 * math.exp(-step / rows) + rng.random() * 0.05
            row = {
                "step": step,
                "time": 1.7e9 + step * 0.1,
                "train/loss": loss,
                "train/lr": 3e-4,
                "train/grad_norm": 1.0 + rng.random(),
                "train/update_ratio": 1e-3,
                "perf/step_time": 0.1,
                "perf/tokens_per_sec": 5000.0 + rng.random() * 100,
                "sys/rss_gb": 1.5,
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument(
        "--no-report",
        action="store_true",
        help="Monitor(report=False): the exit without the report",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        t0 = time.perf_counter()
        prefill(run_dir / "history.jsonl", args.rows)
        size = (run_dir / "history.jsonl").stat().st_size
        print(
            f"prefilled {args.rows} rows ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s"
        )
        ready = Path(tmp) / "ready"
        code = LOOP.format(
            root=str(ROOT), run_dir=str(run_dir), ready=str(ready), report=not args.no_report
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the loop ended early (rc {proc.returncode})")
            time.sleep(0.05)
        t_sig = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        exit_s = time.perf_counter() - t_sig
        end = json.loads((run_dir / "meta.json").read_text()).get("end", {})
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "exit_after_sigterm_s": round(exit_s, 2),
                    "exit_code": rc,
                    "status": end.get("status"),
                    "signal": end.get("signal"),
                    "report": end.get("report", "complete"),
                    "report_json_exists": (run_dir / "report.json").exists(),
                }
            )
        )


if __name__ == "__main__":
    main()
