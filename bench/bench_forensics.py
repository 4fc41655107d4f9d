"""Cost of forensics (and of the guard) on a healthy run: Monitor without vs with.

Each configuration trains a fresh reference model (same seed) for one segment of
``--steps`` optimizer steps, ``mon.step(loss, batch=ids)`` every step; configurations are
interleaved (rotated each round) for ``--rounds`` rounds. Per segment: mean step time (wall,
after 3 warm-up steps; the Monitor's set-up, which takes the first snapshot, and its close
are not timed) and process CPU time. Reported: ratio of the median segment step time to the
Monitor without forensics, the median of per-round ratios, the CPU-time ratio, snapshots
taken per segment, and the keeper's memory (``Keeper.memory_bytes()``: the snapshot's host
buffers, the kept batches) against the parameters' bytes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_forensics.py               # small, ~4 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_forensics.py --size tiny --rounds 9
    .venv/bin/python bench/bench_forensics.py --device cuda --size large

Configurations: Monitor defaults (log_every=10, TensorBoard/console/sampler off: they are
the same in every configuration and only add noise); the same with ``forensics=True`` at
snapshot cadences 10, 50 (the default) and 200; and with the guard
``on_nonfinite="skip"`` (one host sync per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_model.config import ModelConfig
from reference_model.model import Transformer

SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, seq=64, batch=8),
    "small": dict(d_model=128, n_layers=2, n_heads=4, seq=128, batch=8),
    "large": dict(d_model=256, n_layers=4, n_heads=4, seq=256, batch=16),
}

CONFIGS: dict[str, dict[str, Any]] = {
    "Monitor (no forensics)": {},
    "forensics, snapshot_every=10": {"forensics": True, "snapshot_every": 10},
    "forensics, snapshot_every=50 (default)": {"forensics": True, "snapshot_every": 50},
    "forensics, snapshot_every=200": {"forensics": True, "snapshot_every": 200},
    'guard on_nonfinite="skip"': {"on_nonfinite": "skip"},
}
BASE = "Monitor (no forensics)"


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # host sync: the timing needs the kernels finished


def run_segment(options: dict, size, device: str, steps: int, batches) -> dict[str, float]:
    from tdiag import Monitor

    model, opt = build(size, device)
    extra = {"loss_fn": loss_fn} if options.get("forensics") else {}
    with tempfile.TemporaryDirectory() as tmp:
        mon = Monitor(
            model,
            opt,
            run_dir=tmp,
            log_every=10,
            report=False,
            console=False,
            tensorboard=False,
            system=False,
            handle_signals=False,
            **options,
            **extra,
        )

        def train_step(step: int) -> None:
            ids = batches[step % len(batches)]
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(out.loss, tokens=ids.numel(), batch=ids)

        for step in range(1, 4):  # warm-up (not timed)
            train_step(step)
        keeper = mon.keeper
        taken0 = keeper.snapshots_taken if keeper is not None else 0
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(4, 4 + steps):
            train_step(step)
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        mem = keeper.memory_bytes() if keeper is not None else {"snapshot": 0, "batches": 0}
        snaps = (keeper.snapshots_taken - taken0) if keeper is not None else 0
        mon.close()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "wall": wall / steps,
        "cpu": cpu / steps,
        "snapshots": snaps,
        "snapshot_mb": mem["snapshot"] / 2**20,
        "batches_mb": mem["batches"] / 2**20,
        "param_mb": param_bytes / 2**20,
    }


def _timed(obj: Any, name: str, out: list[float], only_true: bool = False) -> None:
    """Wrap ``obj.name`` (an instance attribute shadowing the method) with a timer."""
    fn = getattr(obj, name)

    def wrapped(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = fn(*a, **k)
        if not only_true or r:
            out.append(time.perf_counter() - t0)
        return r

    setattr(obj, name, wrapped)


def attribution(size, device: str, steps: int, batches, cadence: int) -> dict[str, float]:
    """Within one run with forensics on: the time of each keeper call (medians; one busy
    step on a shared machine would dominate a sum) and the step time, so the overhead per
    step is ``record + observe_forward + observe_optimizer_step + snapshot / cadence``."""
    from tdiag import Monitor

    model, opt = build(size, device)
    times: dict[str, list[float]] = {
        k: [] for k in ("record", "forward", "optimizer", "snapshot", "step")
    }
    with tempfile.TemporaryDirectory() as tmp:
        mon = Monitor(
            model,
            opt,
            run_dir=tmp,
            log_every=10,
            report=False,
            console=False,
            tensorboard=False,
            system=False,
            handle_signals=False,
            forensics=True,
            loss_fn=loss_fn,
            snapshot_every=cadence,
        )
        keeper = mon.keeper
        _timed(keeper, "record", times["record"])
        _timed(keeper, "observe_forward", times["forward"])
        _timed(keeper, "observe_optimizer_step", times["optimizer"])
        _timed(keeper, "maybe_snapshot", times["snapshot"], only_true=True)
        for step in range(1, steps + 1):
            ids = batches[step % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(out.loss, tokens=ids.numel(), batch=ids)
            sync(device)
            if step > 3:
                times["step"].append(time.perf_counter() - t0)
        mem = keeper.memory_bytes()
        mon.close()
    # the first snapshot after the optimizer's state appears allocates the host buffers
    # (once per run): leave it out of the per-snapshot time
    times["snapshot"] = times["snapshot"][1:] or times["snapshot"]
    med = {k: statistics.median(v) if v else 0.0 for k, v in times.items()}
    per_step = med["record"] + med["forward"] + med["optimizer"] + med["snapshot"] / cadence
    return {
        "cadence": cadence,
        "step_ms": med["step"] * 1e3,
        "record_us": med["record"] * 1e6,
        "observe_forward_us": med["forward"] * 1e6,
        "observe_optimizer_us": med["optimizer"] * 1e6,
        "snapshot_ms": med["snapshot"] * 1e3,
        "snapshots": len(times["snapshot"]),
        "overhead_pct": 100 * per_step / med["step"],
        "snapshot_mb": mem["snapshot"] / 2**20,
        "batches_mb": mem["batches"] / 2**20,
    }


def guard_attribution(size, device: str, batches, steps: int = 41) -> dict[str, float]:
    """The guard's per-step work (``grads_finite``: the fused norm and the one host read),
    timed on the real gradients of each step, against the training step's time."""
    from tdiag.monitor.guard import grads_finite

    model, opt = build(size, device)
    check, step_t = [], []
    for step in range(1, steps + 1):
        ids = batches[step % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        sync(device)
        t1 = time.perf_counter()
        grads_finite(opt)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if step > 3:
            check.append(t2 - t1)
            step_t.append((t1 - t0) + (t3 - t2))
    c, st = statistics.median(check), statistics.median(step_t)
    return {"check_us": c * 1e6, "step_ms": st * 1e3, "overhead_pct": 100 * c / st}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=200, help="timed steps per segment")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--attribution-steps", type=int, default=301)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (size["batch"], size["seq"]), generator=g).to(args.device)
        for _ in range(8)
    ]
    names = list(CONFIGS)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            results[name].append(run_segment(CONFIGS[name], size, args.device, args.steps, batches))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    table: dict[str, Any] = {}
    if args.rounds:
        base = results[BASE]
        print(
            f"\nsize={args.size} {size} steps/segment={args.steps} rounds={args.rounds} "
            f"threads={args.threads} device={args.device} torch={torch.__version__}"
        )
        print(
            f"Monitor step (no forensics): median {statistics.median(x['wall'] for x in base) * 1e3:.2f} ms"
        )
        print(
            "| configuration | ratio (median step) | median per-round ratio | CPU-time ratio "
            "| snapshots/segment | snapshot MB | batches MB | params MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            segs = results[name]
            ratio = statistics.median(s["wall"] for s in segs) / statistics.median(
                b["wall"] for b in base
            )
            rounds = sorted(s["wall"] / b["wall"] for s, b in zip(segs, base, strict=True))
            per_round = statistics.median(rounds)
            cpu = statistics.median(s["cpu"] / b["cpu"] for s, b in zip(segs, base, strict=True))
            last = segs[-1]
            table[name] = {
                "ratio": ratio,
                "per_round_median": per_round,
                "per_round": rounds,
                "cpu_ratio": cpu,
                **{k: last[k] for k in ("snapshots", "snapshot_mb", "batches_mb", "param_mb")},
            }
            print(
                f"| {name} | {ratio:.3f} | {per_round:.3f} (range {rounds[0]:.2f}–{rounds[-1]:.2f}) "
                f"| {cpu:.3f} | {last['snapshots']:g} | {last['snapshot_mb']:.2f} "
                f"| {last['batches_mb']:.3f} | {last['param_mb']:.2f} |"
            )
    print("\nattributed within one run (medians of each keeper call; overhead per step =")
    print("record + observe_forward + observe_optimizer_step + snapshot / cadence):")
    print(
        "| cadence | step ms | record µs | observe fwd µs | observe opt µs | snapshot ms "
        "| snapshots | overhead % | snapshot MB | batches MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    attributed = []
    for cadence in (10, 50, 200):
        a = attribution(size, args.device, args.attribution_steps, batches, cadence)
        attributed.append(a)
        print(
            f"| {cadence} | {a['step_ms']:.2f} | {a['record_us']:.1f} "
            f"| {a['observe_forward_us']:.1f} | {a['observe_optimizer_us']:.1f} "
            f"| {a['snapshot_ms']:.2f} | {a['snapshots']} | {a['overhead_pct']:.2f} "
            f"| {a['snapshot_mb']:.2f} | {a['batches_mb']:.3f} |"
        )
    table["attribution"] = attributed
    g = guard_attribution(size, args.device, batches)
    table["guard_attribution"] = g
    print(
        f"\nguard (on_nonfinite=): check {g['check_us']:.0f} µs per step against a "
        f"{g['step_ms']:.2f} ms step: {g['overhead_pct']:.2f} %"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": table}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
