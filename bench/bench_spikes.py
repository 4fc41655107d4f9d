"""Benchmark: false-alarm rate of the live loss-spike detector on healthy runs, and what it
catches.

Healthy runs: the reference Transformer (tests' and demo's model) trained on real text (the
Python standard library's sources, bytes), AdamW, linear warmup then cosine, clip 1.0, for
several sizes and seeds. Every per-step loss goes through :class:`SpikeDetector` exactly as
the Monitor feeds it at its log steps (the detector is a pure function of the per-step
losses, so this is the live verdict). A false alarm is a flagged step on such a run.

Sensitivity: the same loss sequences with one step's loss multiplied by ``1 + a`` at
random positions after the first 100 steps (one at a time), for a few amplitudes ``a``:
the share of those injected spikes the detector flags.

    python bench/bench_spikes.py                  # 3 sizes x 3 seeds x 600 steps (~3 min)
    python bench/bench_spikes.py --steps 300 --seeds 0   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

# the checkout's reference_model/ (an install ships it as tdiag.reference_model only)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_model.config import ModelConfig
from reference_model.data import ChunkBatcher, load_corpus, token_stream
from reference_model.model import Transformer, lm_loss
from tdiag.monitor.spikes import SPIKE_MIN_HISTORY, SPIKE_REL, SPIKE_WINDOW, SPIKE_Z, SpikeDetector

SIZES = {
    "d64-L2": dict(d_model=64, n_heads=2, n_layers=2),
    "d128-L2": dict(d_model=128, n_heads=4, n_layers=2),
    "d128-L4": dict(d_model=128, n_heads=4, n_layers=4),
}
AMPLITUDES = (0.25, 0.5, 1.0)
GRID = [(z, rel) for z in (4.0, 6.0, 8.0) for rel in (0.1, 0.25)]


def healthy_losses(size: dict, seed: int, steps: int, batch: int, seq: int, tokens) -> list:
    torch.manual_seed(seed)
    cfg = ModelConfig(max_seq_len=seq, dropout=0.0, **size)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = ChunkBatcher(tokens, batch_size=batch, seq_len=seq, seed=seed)
    losses = []
    for step in range(steps):
        b = data.batch(step)
        out = model(b["input_ids"])
        loss = lm_loss(out.logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # host sync: the bench wants the values (offline)
    return losses


def flagged(losses: list[float], z: float, rel: float, log_every: int = 10) -> tuple[int, int]:
    """(flagged steps, judged steps), feeding the detector log interval by log interval."""
    det = SpikeDetector(window=SPIKE_WINDOW, z=z, rel=rel, min_history=SPIKE_MIN_HISTORY)
    n = 0
    for start in range(0, len(losses), log_every):
        for sp in det.observe(start + 1, losses[start : start + log_every]):
            n += len(sp.steps)
    return n, det.steps_judged


def sensitivity(losses: list[float], amp: float, rng: random.Random, trials: int) -> float:
    hits = 0
    for _ in range(trials):
        i = rng.randrange(min(100, len(losses) // 2), len(losses))
        spiked = list(losses)
        spiked[i] = losses[i] * (1 + amp)
        det = SpikeDetector()
        steps = {s for sp in det.observe(1, spiked) for s in sp.steps}
        hits += (i + 1) in steps
    return hits / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(max_bytes=2_000_000)
    tokens = token_stream(corpus.train)
    runs = []
    t0 = time.perf_counter()
    for name in args.sizes:
        for seed in args.seeds:
            losses = healthy_losses(SIZES[name], seed, args.steps, args.batch, args.seq, tokens)
            row = {"size": name, "seed": seed, "first": losses[0], "last": losses[-1]}
            for z, rel in GRID:
                row[f"z{z:g}_rel{rel:g}"] = flagged(losses, z, rel)
            rng = random.Random(seed)
            row["detected"] = {a: sensitivity(losses, a, rng, args.trials) for a in AMPLITUDES}
            runs.append(row)
            print(json.dumps(row))
    default = f"z{SPIKE_Z:g}_rel{SPIKE_REL:g}"
    summary = {}
    for z, rel in GRID:
        key = f"z{z:g}_rel{rel:g}"
        bad = sum(r[key][0] for r in runs)
        judged = sum(r[key][1] for r in runs)
        summary[key] = {"flagged": bad, "judged": judged, "rate": bad / max(1, judged)}
    detected = {a: sum(r["detected"][a] for r in runs) / len(runs) for a in AMPLITUDES}
    print(
        json.dumps(
            {
                "default": default,
                "window": SPIKE_WINDOW,
                "runs": len(runs),
                "steps_per_run": args.steps,
                "false_alarms": summary,
                "detected_share_by_amplitude": detected,
                "seconds": round(time.perf_counter() - t0, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
