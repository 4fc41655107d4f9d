"""Report scaling: time and peak memory of `tdiag report` on synthetic histories, today's
renderer side by side with the one before it.

For each size (rows = steps) a history of ``--metrics`` metrics is written once (cached
under ``--workdir``), then the full report (read, rules, summary, charts, JSON + HTML) is
built in a fresh subprocess that reports its phase times and its peak resident memory
(``ru_maxrss``). Targets (issue 11): the Python side ≤ 1 s for 10k rows and ≤ 10 s for 1M
rows; (issue 5) within 2 GiB on 2 cores, cost linear in rows.

``--renderer old`` (or ``both``, the default) builds the same report with the matplotlib
renderer of commit ``--old-rev`` (charts.py, render_html.py and the template read with
``git show`` into a temp folder and put in place of today's modules in the child), so the
two are compared in one run on one machine.

    .venv/bin/python bench/bench_report.py                     # 10k, 100k, 1M; old and new
    .venv/bin/python bench/bench_report.py --sizes 10000 --renderer new --json-out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# The metrics a monitored GPU run writes (Contract 3), plus per-layer ones up to --metrics.
BASE_METRICS = [
    "train/loss", "train/lr", "train/grad_norm", "train/grad_clip_frac", "train/update_ratio",
    "perf/step_time", "perf/tokens_per_sec", "perf/mfu", "perf/data_time",
    "sys/gpu_mem_allocated_gb", "sys/gpu_mem_reserved_gb", "sys/gpu_mem_peak_gb", "sys/gpu_util",
    "sys/cpu_percent", "sys/rss_gb",
]  # fmt: skip

# Put the old renderer (sources in argv[2]) in place of today's modules before any import.
_OLD_SETUP = r"""
import importlib.util, sys, types
from pathlib import Path
old = Path(sys.argv[2])
import jinja2
def _load(name, path, patch=lambda s: s):
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    sys.modules[name] = mod
    exec(compile(patch(path.read_text()), str(path), "exec"), mod.__dict__)
    return mod
import tdiag.report
_load("tdiag.report.charts", old / "charts.py")
_load("tdiag.report.render_html", old / "render_html.py", lambda s: s.replace(
    'jinja2.PackageLoader("tdiag.report", "templates")', f'jinja2.FileSystemLoader({str(old)!r})'))
"""

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
if len(sys.argv) > 2:
    exec(OLD_SETUP)
from tdiag.history import read_history
from tdiag.report import build_report
from tdiag.report.charts import build_charts
from tdiag.report.rules import evaluate
import tdiag.report.render_html  # imports outside the timing
t_import = time.perf_counter() - t0
run = Path(sys.argv[1])

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

w, c = time.perf_counter(), cpu()
report = build_report(run)  # the full command path: read, rules, summary, charts, JSON, HTML
report_s, report_cpu = time.perf_counter() - w, cpu() - c
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
phases = {}
w = time.perf_counter(); df, stats = read_history(run); phases["read_s"] = time.perf_counter() - w
w = time.perf_counter(); res = evaluate(df, {}, []); phases["rules_s"] = time.perf_counter() - w
w = time.perf_counter(); build_charts(df, {}, res.findings); phases["charts_s"] = time.perf_counter() - w
print(json.dumps({"import_s": t_import, "report_s": report_s, "report_cpu_s": report_cpu,
                  "peak_rss_mib": rss, "html_bytes": (run / "report.html").stat().st_size,
                  "findings": [f["id"] for f in report["findings"]], **phases}))
"""


def _value(name: str, s: int, n: int, rng: random.Random) -> float:
    if name == "train/loss":
        return 5.0 * math.exp(-s / (n / 5)) + 2.0 + rng.gauss(0.0, 0.02)
    if name == "train/lr":
        return 3e-4 * min(1.0, s / max(1, n // 100))
    if name == "perf/tokens_per_sec":
        return 50_000 + rng.gauss(0.0, 500.0)
    if name == "perf/mfu":
        return 0.4 + rng.gauss(0.0, 0.005)
    if name == "sys/gpu_util":
        return 97.0 + rng.random()
    if name.startswith("sys/gpu_mem"):
        return 40.0 + rng.random() * 0.01
    if name == "perf/step_time":
        return 0.25 + rng.gauss(0.0, 0.002)
    if name == "perf/data_time":
        return 0.002 + 0.001 * rng.random()
    if name == "train/grad_clip_frac":
        return 0.0
    if name == "train/update_ratio":
        return 1e-3 * (1.0 + 0.1 * rng.random())
    if name == "sys/cpu_percent":
        return 30.0 + rng.random()
    return 1.0 + 0.1 * rng.random()


def write_history(path: Path, rows: int, n_metrics: int, seed: int = 0) -> None:
    """A healthy-looking run of ``rows`` steps with ``n_metrics`` metrics per row (+ step, time),
    a validation loss every 1000 steps, and one NaN loss in the last tenth."""
    rng = random.Random(seed)
    names = BASE_METRICS[:n_metrics]
    names += [f"grad_norm/blocks.{i}" for i in range(n_metrics - len(names))]
    nan_step = rows - rows // 20
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for s in range(1, rows + 1):
            parts = [f'"step":{s}', f'"time":{1.7e9 + 0.25 * s:.3f}']
            for name in names:
                v = _value(name, s, rows, rng)
                parts.append(
                    f'"{name}":"NaN"'
                    if (name == "train/loss" and s == nan_step)
                    else f'"{name}":{v:.6g}'
                )
            fh.write("{" + ",".join(parts) + "}\n")
            if s % 1000 == 0:
                fh.write(f'{{"step":{s},"val/loss":{2.1 + 3.0 * math.exp(-s / (rows / 5)):.5f}}}\n')
    os.replace(tmp, path)


def old_sources(rev: str, into: Path) -> Path:
    """charts.py, render_html.py and report.html.j2 of ``rev`` (``git show``) in ``into``."""
    root = Path(__file__).resolve().parents[1]
    into.mkdir(parents=True, exist_ok=True)
    for src, dst in (
        ("tdiag/report/charts.py", "charts.py"),
        ("tdiag/report/render_html.py", "render_html.py"),
        ("tdiag/report/templates/report.html.j2", "report.html.j2"),
    ):
        text = subprocess.run(
            ["git", "show", f"{rev}:{src}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        (into / dst).write_text(text, encoding="utf-8")
    return into


def run_size(workdir: Path, rows: int, n_metrics: int, old: Path | None = None) -> dict:
    run = workdir / f"run-v2-{rows}x{n_metrics}"
    run.mkdir(parents=True, exist_ok=True)
    hist = run / "history.jsonl"
    if not hist.exists():
        write_history(hist, rows, n_metrics)
    env = dict(os.environ, OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    child = "OLD_SETUP = " + repr(_OLD_SETUP) + "\n" + _CHILD
    out = subprocess.run(
        [sys.executable, "-c", child, str(run), *([str(old)] if old else [])],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"report on {rows} rows failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(
        rows=rows,
        metrics=n_metrics,
        history_mib=hist.stat().st_size / 2**20,
        renderer="old" if old else "new",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tdiag-bench-report"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--renderer", choices=("new", "old", "both"), default="both")
    parser.add_argument(
        "--old-rev",
        default="c7b83cf",
        help="commit of the matplotlib renderer (default: the last one)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    old = None
    if args.renderer != "new":
        old = old_sources(args.old_rev, Path(tempfile.mkdtemp(prefix="tdiag-old-renderer-")))
    kinds = {"new": [None], "old": [old], "both": [old, None]}[args.renderer]
    results = []
    print(
        f"{'renderer':>8} {'rows':>9} {'hist MiB':>8} {'report s':>8} {'cpu s':>6} {'us/row':>6} "
        f"{'read s':>6} {'rules s':>7} {'charts s':>8} {'peak RSS MiB':>12} {'html KiB':>8}"
    )
    for rows in sizes:
        for kind in kinds:
            r = run_size(args.workdir, rows, args.metrics, kind)
            results.append(r)
            print(
                f"{r['renderer']:>8} {rows:>9,} {r['history_mib']:>8.1f} {r['report_s']:>8.2f} {r['report_cpu_s']:>6.2f} "
                f"{1e6 * r['report_cpu_s'] / rows:>6.2f} {r['read_s']:>6.2f} {r['rules_s']:>7.2f} "
                f"{r['charts_s']:>8.2f} {r['peak_rss_mib']:>12.0f} {r['html_bytes'] / 1024:>8.0f}"
            )
            if r["findings"]:
                print(f"{'':>9} findings: {', '.join(r['findings'])}")
    by = {(r["renderer"], r["rows"]): r for r in results}
    for rows in sizes:
        if ("old", rows) in by and ("new", rows) in by:
            o, n = by["old", rows], by["new", rows]
            print(
                f"{rows:>9,} rows: old/new report wall {o['report_s'] / n['report_s']:.1f}x, "
                f"CPU {o['report_cpu_s'] / n['report_cpu_s']:.1f}x, "
                f"charts {o['charts_s'] / max(n['charts_s'], 1e-9):.0f}x"
            )
    news = [r for r in results if r["renderer"] == "new"]
    if len(news) >= 2:
        a, b = news[-2], news[-1]
        ratio = b["report_cpu_s"] / a["report_cpu_s"]
        print(f"cost ratio (new): {b['rows'] // a['rows']}x rows -> {ratio:.1f}x CPU time")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
