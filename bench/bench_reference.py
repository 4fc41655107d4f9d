"""Benchmark: a training step of the reference Transformer vs a minimal plain-PyTorch GPT.

Both models have identical shapes (GPT-2 style: learned positions, pre-LayerNorm, GELU MLP,
tied head, biases) and run the same step: forward, next-token cross-entropy, backward,
clip to 1.0, AdamW. The minimal GPT is written below in ~50 lines, as a person would write
it from scratch; the reference model runs through the trainer's own code
(``reference_model.train.forward_backward`` + ``param_groups``). The two are interleaved
in one process (ABAB... segments, a fresh warm-up per model) and compared by the median
step time; tokens/s and achieved FLOP/s (6 N + 12 n_layers L d per token, PaLM appendix B)
come with it. On a shared CPU use 1 thread (default) and read the ratio, not absolute times.

    python bench/bench_reference.py                 # small: d 128, 2 layers, seq 128, batch 8
    python bench/bench_reference.py --size large    # d 256, 4 layers, seq 256, batch 16
    python bench/bench_reference.py --device cuda --size large --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# the checkout's reference_model/ (an install ships it as tdiag.reference_model only)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_model.config import ModelConfig
from reference_model.model import Transformer
from reference_model.train import autocast_context, forward_backward, param_groups

SIZES = {
    "small": dict(d_model=128, n_heads=4, n_layers=2, seq_len=128, batch=8),
    "large": dict(d_model=256, n_heads=4, n_layers=4, seq_len=256, batch=16),
    "gpu": dict(d_model=768, n_heads=12, n_layers=12, seq_len=1024, batch=16),
}
VOCAB = 257


# --------------------------------------------------------------------------- the minimal GPT


class MinimalBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int, d: int, h: int, n_layers: int, max_len: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, h) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------- the two steps


@dataclass
class Contender:
    name: str
    model: nn.Module
    step: object  # callable () -> None
    n_params: int


def make_contenders(size: dict, device: torch.device, precision: str) -> list[Contender]:
    d, h, n, L, B = (
        size["d_model"],
        size["n_heads"],
        size["n_layers"],
        size["seq_len"],
        size["batch"],
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (B, L), generator=g).to(device)

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=d,
        n_heads=h,
        n_layers=n,
        max_seq_len=L,
        pos_encoding="learned",
        norm="layernorm",
        activation="gelu",
        tie_embeddings=True,
        bias=True,
        dropout=0.0,
    )
    ref = Transformer(cfg).to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-4, **fused)
    batch = {"input_ids": ids, "labels": ids}

    def ref_step() -> None:
        forward_backward(ref, [batch], precision=precision, n_labels=B * (L - 1))
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    mini = MinimalGPT(VOCAB, d, h, n, L).to(device).train()
    mini_opt = torch.optim.AdamW(mini.parameters(), lr=1e-4, weight_decay=0.1, **fused)

    def mini_step() -> None:
        with autocast_context(device, precision):
            logits = mini(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(mini.parameters(), 1.0)
        mini_opt.step()
        mini_opt.zero_grad(set_to_none=True)

    n_ref = sum(p.numel() for p in ref.parameters())
    n_mini = sum(p.numel() for p in mini.parameters())
    assert n_ref == n_mini, (n_ref, n_mini)  # identical shapes
    return [
        Contender("reference", ref, ref_step, n_ref),
        Contender("minimal", mini, mini_step, n_mini),
    ]


def flops_per_token(n_params: int, size: dict) -> float:
    """6 N (matmuls fwd+bwd; positions are a lookup, not a matmul) + attention 12 n_layers L d."""
    n_matmul = n_params - size["seq_len"] * size["d_model"]
    return 6 * n_matmul + 12 * size["n_layers"] * size["seq_len"] * size["d_model"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: timing needs the kernels finished


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = SIZES[args.size]
    contenders = make_contenders(size, device, args.dtype)
    for c in contenders:  # warm-up: allocator, kernels, optimizer state
        for _ in range(args.warmup):
            c.step()
    sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu_times: dict[str, list[float]] = {c.name: [] for c in contenders}
    ratios = []
    for seg in range(args.segments):
        order = contenders if seg % 2 == 0 else contenders[::-1]  # ABBA: no order bias
        seg_median = {}
        for c in order:
            step_times = []
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                c.step()
                sync(device)
                step_times.append(time.perf_counter() - t0)
                cpu_times[c.name].append(time.process_time() - c0)
            times[c.name] += step_times
            seg_median[c.name] = statistics.median(step_times)
        ratios.append(seg_median["reference"] / seg_median["minimal"])
    tokens = size["batch"] * size["seq_len"]
    result = {
        "size": args.size,
        **size,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "segments": args.segments,
        "steps_per_segment": args.steps,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_time_ratio": statistics.median(cpu_times["reference"])
        / statistics.median(cpu_times["minimal"]),
    }
    for c in contenders:
        t = statistics.median(times[c.name])
        fpt = flops_per_token(c.n_params, size)
        result[c.name] = {
            "params": c.n_params,
            "step_ms": 1e3 * t,
            "tokens_per_s": tokens / t,
            "gflops_per_s": fpt * tokens / t / 1e9,
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--segments", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="Steps per segment.")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = p.parse_args()
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"{r['size']}: d_model {r['d_model']}, {r['n_layers']} layers, seq {r['seq_len']}, "
        f"batch {r['batch']}, {r['device']} {r['dtype']}, {r['threads']} thread(s), "
        f"{r['segments']} x {r['steps_per_segment']} steps interleaved"
    )
    print(f"{'model':<10} {'params':>9} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>9}")
    for name in ("reference", "minimal"):
        m = r[name]
        print(
            f"{name:<10} {m['params']:>9,} {m['step_ms']:>9.2f} {m['tokens_per_s']:>10,.0f} "
            f"{m['gflops_per_s']:>9.1f}"
        )
    print(
        f"ratio reference/minimal (median of per-segment medians): {r['ratio_median']:.3f} "
        f"[{r['ratio_min']:.3f} .. {r['ratio_max']:.3f}]; CPU-time ratio {r['cpu_time_ratio']:.3f}"
    )
    verdict = "within" if r["ratio_median"] <= 1.10 else "NOT within"
    print(f"{verdict} the 10% target")
    if not math.isfinite(r["ratio_median"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
