"""Time of the Monitor's close (which writes the report) on a run whose history is long.

A run folder is prefilled with ``--rows`` history rows of 20 metrics (bench_report's
synthetic run), a small loop with the Monitor appends ``--steps`` steps to it, then
``mon.close()`` is timed (wall and process CPU): flushing the sinks, meta.json, and
building report.json + report.html from the whole history. Target (issue 11): ≤ 1 s at 10k
rows. Each repeat uses a fresh copy of the run folder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_monitor_close.py --rows 10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from bench_report import write_history

    from reference_model.config import ModelConfig
    from reference_model.model import Transformer
    from tdiag import Monitor

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tdiag-close-"))
    seed = work / "seed"
    seed.mkdir()
    # The Monitor resumes at step ``rows`` (load_state_dict), as a resumed long run does.
    write_history(seed / "history.jsonl", args.rows, 20)
    walls, cpus = [], []
    for r in range(args.repeats):
        run = work / f"run{r}"
        shutil.copytree(seed, run)
        model = Transformer(
            ModelConfig(vocab_size=257, d_model=64, n_heads=2, n_layers=2, max_seq_len=64)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(model, opt, run_dir=str(run), log_every=5, console=False, system=False)
        state = mon.state_dict()
        mon.load_state_dict({**state, "step": args.rows})
        for _ in range(args.steps):
            x = torch.randint(0, 257, (4, 64))
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()
            )
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss, tokens=x.numel())
        w, c = time.perf_counter(), time.process_time()
        mon.close()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        report = json.loads((run / "report.json").read_text())
        rows = report["summary"].get("rows")
    print(
        f"Monitor close, {args.rows:,} prefilled rows + {args.steps} steps: "
        f"wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}), "
        f"CPU median {statistics.median(cpus):.2f} s over {args.repeats} repeats; "
        f"the report read {rows:,} rows"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
