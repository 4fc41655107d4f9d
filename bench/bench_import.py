"""What `import tdiag` (and `from tdiag import Monitor`) costs beyond `import torch`.

Fresh interpreters, interleaved (A B C A B C …) so that a busy machine slows all three
alike; the figures are the differences of medians of process wall time and of process
CPU time (user + system, steadier than wall time on a busy machine). Target (issue 11):
at most 0.3 s beyond `import torch`. Also lists the heavy libraries each import loads and
the slowest tdiag modules by `-X importtime` (cumulative µs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_import.py            # 15 rounds
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_import.py --rounds 30 --json-out /tmp/i.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "torch": "import torch",
    "torch + tdiag": "import torch; import tdiag",
    "torch + Monitor": "import torch; import tdiag; from tdiag import Monitor",
    # what `from tdiag import Monitor` loaded before issue 11 (tdiag.history imported pandas)
    "torch + Monitor + pandas": "import torch; import pandas; from tdiag import Monitor",
}
HEAVY = ("pandas", "matplotlib", "jinja2", "rich", "tensorboard", "psutil", "typer", "scipy")


def _wall(code: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of a fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _loaded(code: str) -> list[str]:
    probe = f"{code}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return out.stdout.split()


def _slowest_tdiag_modules(code: str, top: int = 8) -> list[tuple[str, int]]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip().startswith("tdiag"):
            rows.append((parts[2].strip(), int(parts[1])))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    for code in CASES.values():  # warm the page cache and .pyc files
        _wall(code)
    times: dict[str, list[float]] = {k: [] for k in CASES}
    cpus: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():
            wall, cpu = _wall(code)
            times[name].append(wall)
            cpus[name].append(cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
    result = {
        "rounds": args.rounds,
        "median_s": med,
        "median_cpu_s": cpu_med,
        "beyond_torch_s": {k: med[k] - med["torch"] for k in CASES if k != "torch"},
        "beyond_torch_cpu_s": {k: cpu_med[k] - cpu_med["torch"] for k in CASES if k != "torch"},
        "heavy_loaded": {k: _loaded(c) for k, c in CASES.items()},
        "slowest_tdiag_modules_us": _slowest_tdiag_modules(CASES["torch + Monitor"]),
    }
    for k in CASES:
        extra = (
            ""
            if k == "torch"
            else (
                f"  (+{result['beyond_torch_s'][k]:.3f} s wall, "
                f"+{result['beyond_torch_cpu_s'][k]:.3f} s CPU)"
            )
        )
        print(
            f"{k:16s} median {med[k]:.3f} s wall, {cpu_med[k]:.3f} s CPU{extra}  "
            f"heavy: {result['heavy_loaded'][k]}"
        )
    print("slowest tdiag modules (cumulative µs):", result["slowest_tdiag_modules_us"])
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
