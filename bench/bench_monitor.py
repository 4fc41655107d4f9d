"""Overhead of tdiag's Monitor vs what users pay today for comparable information.

Each configuration trains a fresh reference model (same seed) for one segment of
``--steps`` optimizer steps; configurations are interleaved (ABAB…, rotated each round)
for ``--rounds`` rounds. Per segment: mean step time (wall, after 3 warm-up steps, setup
and close excluded) and process CPU time. Reported: ratio of the median segment step time
to the plain loop's, and the median of per-round ratios (wall and CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_monitor.py            # small, ~5 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_monitor.py --size large --rounds 3

Configurations: plain; tdiag Monitor defaults (log_every=10: history + TensorBoard +
console + system sampler; report off: it is built after training); Monitor
watch="layers"; wandb.watch(log="all", log_freq=100) offline; TensorBoard add_histogram of
every parameter and gradient every 100 steps; torch.autograd.set_detect_anomaly(True);
transformers' DebugUnderflowOverflow. Use a --steps multiple of 100 so that the "every 100
steps" tools log once per segment (amortised as in a real run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_model.config import ModelConfig
from reference_model.model import Transformer

SIZES = {  # as in the design folder's PERFORMANCE-NOTES
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, seq=64, batch=8),
    "small": dict(d_model=128, n_layers=2, n_heads=4, seq=128, batch=8),
    "large": dict(d_model=256, n_layers=4, n_heads=4, seq=256, batch=16),
}

Hook = Callable[[int, torch.nn.Module], None]


def build(size: dict[str, int], device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=size["d_model"],
        n_layers=size["n_layers"],
        n_heads=size["n_heads"],
        max_seq_len=size["seq"],
    )
    model = Transformer(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4)


class Segment:
    """One configuration's set-up around a training segment (a context manager factory)."""

    def __init__(self, name: str, setup: Callable[..., Any]) -> None:
        self.name, self.setup = name, setup


@contextlib.contextmanager
def plain(model, opt, tmp) -> Iterator[tuple[Hook | None, Any]]:
    yield None, None


@contextlib.contextmanager
def monitor(model, opt, tmp, **kw) -> Iterator[tuple[Hook | None, Any]]:
    from tdiag import Monitor

    with contextlib.redirect_stderr(io.StringIO()):  # the console sink runs, not shown
        mon = Monitor(model, opt, run_dir=tmp, log_every=10, report=False, **kw)
        try:
            yield None, mon
        finally:
            mon.close()


@contextlib.contextmanager
def wandb_watch(model, opt, tmp) -> Iterator[tuple[Hook | None, Any]]:
    import wandb

    wandb.watch(model, log="all", log_freq=100)
    try:
        yield None, None
    finally:
        wandb.unwatch(model)


@contextlib.contextmanager
def tb_histograms(model, opt, tmp) -> Iterator[tuple[Hook | None, Any]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp))

    def before_zero_grad(step: int, m: torch.nn.Module) -> None:
        if step % 100 == 0:
            for name, p in m.named_parameters():
                writer.add_histogram(f"param/{name}", p.detach(), step)
                if p.grad is not None:
                    writer.add_histogram(f"grad/{name}", p.grad, step)

    try:
        yield before_zero_grad, None
    finally:
        writer.close()


@contextlib.contextmanager
def anomaly(model, opt, tmp) -> Iterator[tuple[Hook | None, Any]]:
    torch.autograd.set_detect_anomaly(True)
    try:
        yield None, None
    finally:
        torch.autograd.set_detect_anomaly(False)


@contextlib.contextmanager
def hf_debug(model, opt, tmp) -> Iterator[tuple[Hook | None, Any]]:
    from transformers.debug_utils import DebugUnderflowOverflow

    DebugUnderflowOverflow(model)  # hooks stay on this (fresh, discarded) model
    yield None, None


def run_segment(seg: Segment, size, device, steps, batches) -> dict[str, float]:
    model, opt = build(size, device)
    with tempfile.TemporaryDirectory() as tmp, seg.setup(model, opt, Path(tmp)) as (hook, mon):

        def train_step(step: int) -> None:
            ids = batches[step % len(batches)]
            out = model(ids, labels=ids)
            out.loss.backward()
            if hook is not None:
                hook(step, model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.step(out.loss, tokens=ids.numel())

        for step in range(1, 4):  # warm-up (not timed)
            train_step(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(4, 4 + steps):
            train_step(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall / steps, "cpu": cpu / steps}


CONFIGS = {
    "plain": Segment("plain", plain),
    "tdiag Monitor (defaults)": Segment("monitor", monitor),
    'tdiag Monitor watch="layers"': Segment(
        "layers", lambda m, o, t: monitor(m, o, t, watch="layers")
    ),
    'wandb.watch(log="all", log_freq=100)': Segment("wandb", wandb_watch),
    "TensorBoard histograms every 100 steps": Segment("tb", tb_histograms),
    "set_detect_anomaly(True)": Segment("anomaly", anomaly),
    "HF DebugUnderflowOverflow": Segment("hf", hf_debug),
}


def attribution(size, device, steps, batches, watch) -> dict[str, float]:
    """The Monitor's cost from within ONE run (robust to a noisy machine): per step, the time
    of the training step (forward..zero_grad, which includes the hooks armed for log steps)
    and of ``mon.step()``. Non-log training steps carry no tdiag work but a clock read, so
    ``overhead = (n_log × (extra of a log step + its mon.step) + n_other × mon.step) /
    (steps × median non-log step)``, each term a median over its steps."""
    from tdiag import Monitor

    model, opt = build(size, device)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        mon = Monitor(model, opt, run_dir=tmp, log_every=10, report=False, watch=watch)
        train_t, mon_t = {}, {}
        for step in range(1, steps + 1):
            ids = batches[step % len(batches)]
            t0 = time.perf_counter()
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            mon.step(out.loss, tokens=ids.numel())
            train_t[step], mon_t[step] = t1 - t0, time.perf_counter() - t1
        mon.close()
    timed = [s for s in train_t if s > 10]  # skip step 1 (one-time FLOP/peak set-up) and warm-up
    log = [s for s in timed if s % 10 == 0]
    base = statistics.median(train_t[s] for s in timed if s % 10 not in (0,))
    # medians, not sums: one preempted step on a shared machine would dominate a sum
    log_extra = statistics.median(train_t[s] - base for s in log)
    non_log_mon = statistics.median(mon_t[s] for s in timed if s % 10)
    log_mon = statistics.median(mon_t[s] for s in log)
    extra = len(log) * (log_extra + log_mon) + (len(timed) - len(log)) * non_log_mon
    return {
        "overhead": extra / (len(timed) * base),
        "mon_step_non_log_us": statistics.median(mon_t[s] for s in timed if s % 10) * 1e6,
        "mon_step_log_ms": statistics.median(mon_t[s] for s in log) * 1e3,
        "log_step_train_extra_ms": statistics.median(train_t[s] - base for s in log) * 1e3,
        "step_ms": base * 1e3,
    }


def available(names: list[str]) -> list[str]:
    out = []
    for name in names:
        seg = CONFIGS[name]
        try:
            if seg.name == "wandb":
                import wandb  # noqa: F401
            if seg.name == "hf":
                import transformers  # noqa: F401
        except ImportError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=100, help="timed steps per segment")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="", help="comma-separated config short names")
    p.add_argument("--attribution-steps", type=int, default=201)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (size["batch"], size["seq"]), generator=g).to(args.device)
        for _ in range(8)
    ]
    names = list(CONFIGS)
    if args.only:
        keep = set(args.only.split(",")) | {"plain"}
        names = [n for n in names if CONFIGS[n].name in keep]
    names = available(names)
    if any(CONFIGS[n].name == "wandb" for n in names):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_dir = tempfile.mkdtemp(prefix="bench-wandb-")
        wandb.init(project="tdiag-bench", dir=wandb_dir, mode="offline")

    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            results[name].append(run_segment(CONFIGS[name], size, args.device, args.steps, batches))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    table: dict[str, Any] = {}
    if args.rounds:
        base = results["plain"]
        print(
            f"\nsize={args.size} {size} steps/segment={args.steps} rounds={args.rounds} "
            f"threads={args.threads} device={args.device} torch={torch.__version__}"
        )
        print(f"plain step: median {statistics.median(x['wall'] for x in base) * 1e3:.1f} ms wall")
        header = "| configuration | ratio (median step) | median per-round ratio | CPU-time ratio |"
        print(header + "\n|---|---|---|---|")
        for name in names:
            segs = results[name]
            ratio = statistics.median(s["wall"] for s in segs) / statistics.median(
                b["wall"] for b in base
            )
            per_round = statistics.median(
                s["wall"] / b["wall"] for s, b in zip(segs, base, strict=True)
            )
            cpu = statistics.median(s["cpu"] / b["cpu"] for s, b in zip(segs, base, strict=True))
            per_round_all = sorted(s["wall"] / b["wall"] for s, b in zip(segs, base, strict=True))
            table[name] = {
                "ratio": ratio,
                "per_round_median": per_round,
                "cpu_ratio": cpu,
                "per_round": per_round_all,
            }
            print(
                f"| {name} | {ratio:.3f} | {per_round:.3f} (range {per_round_all[0]:.2f}–"
                f"{per_round_all[-1]:.2f}) | {cpu:.3f} |"
            )
    print("\nattributed within one run (see attribution()):")
    for watch in (None, "layers"):
        a = attribution(size, args.device, args.attribution_steps, batches, watch)
        table[f"attribution watch={watch}"] = a
        print(
            f"  watch={watch}: overhead {a['overhead'] * 100:.2f}% of the step "
            f"(step {a['step_ms']:.1f} ms; mon.step {a['mon_step_non_log_us']:.0f} us on "
            f"non-log steps, {a['mon_step_log_ms']:.2f} ms on log steps; log-step training "
            f"step +{a['log_step_train_extra_ms']:.2f} ms)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": table}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
