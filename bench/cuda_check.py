"""CUDA verification of the Monitor: overhead, MFU, NVML utilisation and memory.

Trains the reference model on the GPU in interleaved segments (plain, Monitor with default
settings, Monitor with watch="layers"; fresh model per segment, bf16 autocast), prints the
step-time ratios, the Monitor's MFU, NVML GPU utilisation and CUDA memory, and counts host
syncs on non-log steps with ``torch.cuda.set_sync_debug_mode("warn")``. On a machine without
CUDA it says so and exits 0.

    bash bench/cuda_check.sh                      # ~2-4 min on one H100/H200
    bash bench/cuda_check.sh --rounds 2 --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args):
    from reference_model.config import ModelConfig
    from reference_model.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        max_seq_len=args.seq_len,
        pos_encoding="rope",
    )
    model = Transformer(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    return model, opt


def segment(args, batches, kind: str) -> dict:
    from tdiag import Monitor

    model, opt = build(args)
    mon = None
    run_dir = tempfile.mkdtemp(prefix=f"cuda-check-{kind}-")
    if kind != "plain":
        mon = Monitor(
            model,
            opt,
            run_dir=run_dir,
            log_every=10,
            report=False,
            console=False,
            watch="layers" if kind == "layers" else None,
            system_interval_s=1.0,
            seq_len=args.seq_len,
        )

    def step(i: int) -> None:
        ids = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.step(loss, tokens=ids.numel(), grad_norm=norm)

    for i in range(1, 11):  # warm-up
        step(i)
    torch.cuda.synchronize()
    syncs_non_log = 0
    t0 = time.perf_counter()
    for i in range(11, 11 + args.steps):
        log_step = i % 10 == 0
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(i)
        torch.cuda.set_sync_debug_mode("default")
        if not log_step:
            syncs_non_log += sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    out = {"step_time": wall, "syncs_non_log": syncs_non_log}
    if mon is not None:
        m = dict(mon.last_metrics)
        mon.close()
        out.update(
            {
                k: m.get(k)
                for k in (
                    "perf/mfu",
                    "perf/tokens_per_sec",
                    "sys/gpu_util",
                    "sys/gpu_mem_used_gb",
                    "sys/gpu_mem_allocated_gb",
                    "sys/gpu_mem_peak_gb",
                    "train/loss",
                )
            }
        )
        out["perf_info"] = mon.perf_info
        out["n_metrics"] = len(m)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "cuda_check: no CUDA device here (torch.cuda.is_available() is False); "
            "nothing to measure. Run it on a GPU machine."
        )
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g).cuda() for _ in range(4)
    ]
    kinds = ["plain", "monitor", "layers"]
    results = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds[r % 3 :] + kinds[: r % 3]:
            results[kind].append(segment(args, batches, kind))
            print(
                f"round {r + 1} {kind}: {results[kind][-1]['step_time'] * 1e3:.2f} ms/step",
                flush=True,
            )
    base = statistics.median(s["step_time"] for s in results["plain"])
    print(
        f"\n{torch.cuda.get_device_name()} torch {torch.__version__}; "
        f"d_model {args.d_model}, {args.n_layers} layers, seq {args.seq_len}, "
        f"batch {args.batch_size}, bf16 autocast, {args.steps} steps x {args.rounds} rounds"
    )
    print(f"plain step: {base * 1e3:.2f} ms")
    summary = {
        "device": torch.cuda.get_device_name(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    for kind in kinds:
        med = statistics.median(s["step_time"] for s in results[kind])
        last = results[kind][-1]
        row = {
            "ratio": med / base,
            "step_time_ms": med * 1e3,
            "syncs_non_log_steps": sum(s["syncs_non_log"] for s in results[kind]),
        }
        row.update({k: v for k, v in last.items() if k not in ("step_time", "syncs_non_log")})
        summary[kind] = row
        print(
            f"{kind:8s} ratio {row['ratio']:.4f}  host-sync warnings on non-log steps: "
            f"{row['syncs_non_log_steps']}  MFU {row.get('perf/mfu')}  "
            f"GPU util {row.get('sys/gpu_util')}%  mem used {row.get('sys/gpu_mem_used_gb')} GB "
            f"peak alloc {row.get('sys/gpu_mem_peak_gb')} GB"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
