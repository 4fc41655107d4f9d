"""Benchmark of the debugger and of the hooks layer (not a test).

1. ``tdiag check`` speed: load the reference model (default config) and run every check,
   ``--repeats`` times; report the median wall time per check and in total.
2. Idle overhead of the hooks layer: ActivationRecorder + GradientRecorder attached with
   ``enabled = False`` vs no hooks, on forward + backward of the same model. Segments of
   ``--steps`` steps alternate plain / hooked (ABAB...), ``--segments`` of each; the ratio
   of medians of per-step wall time and of process CPU time is reported
   (PERFORMANCE-NOTES: interleave, medians, CPU time beside wall, 1 thread for ratios).

Usage::

    python bench/bench_check.py [--threads 2] [--repeats 3] [--segments 20] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = str(ROOT / "reference_model" / "model.py")


def bench_checks(repeats: int, threads: int) -> None:
    from tdiag.debug.runner import run_checks
    from tdiag.loading import load_target

    torch.set_num_threads(threads)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    totals, cpu_totals, loads = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ctx = load_target(TARGET)
        loads.append(time.perf_counter() - t0)
        starts: list[float] = []  # process CPU time at the start of each check
        run = run_checks(ctx, on_start=lambda *_, s=starts: s.append(time.process_time()))
        starts.append(time.process_time())
        totals.append(run.seconds)
        cpu_totals.append(starts[-1] - starts[0])
        for i, r in enumerate(run.results):
            wall.setdefault(r.id, []).append(r.seconds)
            cpu.setdefault(r.id, []).append(starts[i + 1] - starts[i])
            if r.status == "error":
                print(f"  ! {r.id} errored: {r.message}", file=sys.stderr)
    med = statistics.median
    print(
        f"## tdiag check {Path(TARGET).relative_to(ROOT)} ({threads} threads, median of {repeats})"
    )
    n_params = sum(p.numel() for p in ctx.model.parameters())
    print(f"batch {tuple(ctx.input_ids.shape)}, {n_params:,} params")
    print("| check | wall s | CPU s (process, all threads) |\n|---|---|---|")
    for cid, secs in sorted(wall.items(), key=lambda kv: -med(kv[1])):
        print(f"| `{cid}` | {med(secs):.3f} | {med(cpu[cid]):.3f} |")
    print(
        f"| **all checks** | **{med(totals):.2f}** (min {min(totals):.2f}, max {max(totals):.2f})"
        f" | {med(cpu_totals):.2f} |"
    )
    print(f"| loading (import, build, one forward) | {med(loads):.2f} | |")


def _step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def bench_idle_hooks(segments: int, steps: int, threads: int) -> None:
    from tdiag.hooks import ActivationRecorder, GradientRecorder
    from tdiag.loading import load_target

    torch.set_num_threads(threads)
    ctx = load_target(TARGET)
    model = ctx.model.train()
    ids = ctx.input_ids
    act, grad = ActivationRecorder(model, inputs=True), GradientRecorder(model)
    for _ in range(3):
        _step(model, ids)  # warm-up
    wall: dict[str, list[float]] = {"plain": [], "idle hooks": []}
    cpu: dict[str, list[float]] = {"plain": [], "idle hooks": []}
    for _ in range(segments):
        for mode in ("plain", "idle hooks"):
            if mode == "idle hooks":
                act.attach()
                grad.attach()
                act.enabled = grad.enabled = False
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                _step(model, ids)
            wall[mode].append((time.perf_counter() - w0) / steps)
            cpu[mode].append((time.process_time() - c0) / steps)
            act.detach()
            grad.detach()
    assert not act.records and not grad.records
    n_hooks = sum(1 for _ in model.modules()) - 1
    print(f"\n## idle hooks vs plain forward+backward ({threads} thread(s))")
    print(
        f"batch {tuple(ids.shape)}, {n_hooks} modules hooked (forward x2) + "
        f"{sum(1 for p in model.parameters())} parameter hooks; {segments} interleaved segments "
        f"of {steps} steps each"
    )
    pw, hw = statistics.median(wall["plain"]), statistics.median(wall["idle hooks"])
    pc, hc = statistics.median(cpu["plain"]), statistics.median(cpu["idle hooks"])
    print("| | plain | idle hooks | ratio |\n|---|---|---|---|")
    print(f"| wall ms/step (median) | {pw * 1e3:.2f} | {hw * 1e3:.2f} | {hw / pw:.4f} |")
    print(f"| CPU ms/step (median) | {pc * 1e3:.2f} | {hc * 1e3:.2f} | {hc / pc:.4f} |")
    paired = [h / p for h, p in zip(wall["idle hooks"], wall["plain"], strict=True)]
    print(f"| paired segment ratio (median) | | | {statistics.median(paired):.4f} |")
    # The cost of our own code: one idle hook call times the calls per step (two forward hooks
    # per module, one hook per parameter; idle, no tensor hooks are registered). The rest of
    # the measured overhead is torch's slower Module.__call__ path once any hook exists.
    n_calls = 2 * n_hooks + sum(1 for _ in model.parameters())
    per_call = _idle_call_cost()
    print(
        f"| idle hook call (micro-benchmark) | | {per_call * 1e9:.0f} ns x {n_calls} calls/step = "
        f"{per_call * n_calls * 1e6:.1f} us | {1 + per_call * n_calls / pc:.5f} (vs CPU step) |"
    )


def _idle_call_cost(n: int = 200_000) -> float:
    """Seconds per call of an idle (enabled = False) forward hook, as torch would call it."""
    from tdiag.hooks import ActivationRecorder

    lin = torch.nn.Linear(2, 2)
    rec = ActivationRecorder(torch.nn.Sequential(lin), inputs=True)
    rec.enabled = False
    hook = rec._make_hook("0", lin)
    x = torch.zeros(1, 2)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            hook(lin, (x,), {}, x)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the check timing")
    ap.add_argument(
        "--hook-threads", type=int, default=1, help="torch threads for the overhead ratio"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segments", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args()
    if not args.skip_checks:
        bench_checks(args.repeats, args.threads)
    bench_idle_hooks(args.segments, args.steps, args.hook_threads)


if __name__ == "__main__":
    main()
