"""Command line of the reference trainer (``python -m reference_model.train``; installed:
``python -m tdiag.reference_model.train``) and ``tdiag demo``. One flag per field of
:class:`TrainConfig` and :class:`ModelConfig`; bad input is one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .callbacks import DemoProgress, ProgressLine, attach_monitor
from .checkpointing import ResumeError
from .config import ModelConfig, TrainConfig
from .data import ByteTokenizer, DataError
from .model import Transformer
from .runtime import check_runtime
from .train import train

_MODEL_FLAGS_HELP = {
    "d_model": "Width of the residual stream.",
    "n_heads": "Attention heads.",
    "n_layers": "Transformer blocks.",
    "d_ff": "Feed-forward width (default 4*d_model, 8/3*d_model for swiglu).",
    "max_seq_len": "Longest sequence (learned positions).",
    "dropout": "Dropout probability.",
    "pos_encoding": "sinusoidal | learned | rope | none.",
    "norm": "layernorm | rmsnorm.",
    "norm_position": "pre | post.",
    "activation": "gelu | relu | swiglu.",
    "tie_embeddings": "Tie the output head to the embedding.",
    "causal": "Causal decoder (--no-causal: bidirectional encoder, denoising objective).",
    "bias": "Biases in linear layers and LayerNorm.",
    "init_std": "Std of the weight init.",
    "activation_checkpointing": "Recompute activations in backward to save memory.",
}
_SKIP_MODEL_FLAGS = {"vocab_size", "pad_id"}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, help_text: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    typ = str(f.type)
    default = f.default
    if typ == "bool":
        parser.add_argument(
            flag,
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=help_text,
        )
        return
    base = typ.replace(" | None", "")
    conv = {"int": int, "float": float, "str": str}.get(base)
    if conv is None:  # a type this simple parser does not handle (e.g. rope_base: float already is)
        return
    parser.add_argument(
        flag, dest=f.name, type=conv, default=default, help=f"{help_text} (default: {default})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {__package__}.train",
        description="Train the reference Transformer (byte-level LM on Python's stdlib by default).",
    )
    g = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            _add_field(g, f, f.metadata.get("help", ""))
    g.add_argument(
        "--no-monitor", action="store_true", help="Do not attach tdiag's Monitor (needs --out-dir)."
    )
    g.add_argument(
        "--watch", choices=["layers"], default=None, help="Monitor per-layer statistics too."
    )
    g.add_argument("--sample", type=int, default=200, help="Bytes to generate at the end (rank 0).")
    m = p.add_argument_group("model")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _SKIP_MODEL_FLAGS:
            _add_field(m, f, _MODEL_FLAGS_HELP.get(f.name, f.name.replace("_", " ") + "."))
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    model_kw = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ModelConfig)
        if hasattr(args, f.name)
    }
    train_kw = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model"
    }
    return TrainConfig(model=ModelConfig(**model_kw), **train_kw)


def sample_text(model: Transformer, prompt: str, n: int, *, seed: int = 0) -> str:
    tok = ByteTokenizer()
    device = next(model.parameters()).device
    ids = tok.encode(prompt)[None].to(device)
    if model.config.pos_encoding == "learned":
        n = max(0, min(n, model.config.max_seq_len - ids.shape[1]))
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, n, temperature=0.8, top_k=40, generator=g)
    return tok.decode(out[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_runtime(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _log_to_stderr()
    quiet = cfg.quiet or rank != 0
    mon = None
    if cfg.out_dir and not args.no_monitor:
        mon = attach_monitor(cfg, Path(cfg.out_dir), quiet=quiet, watch=args.watch)
    try:
        if mon is not None:
            with mon:
                result = train(cfg, [mon])
        else:
            progress = [] if quiet else [ProgressLine(log_every=cfg.log_every, total=cfg.steps)]
            result = train(cfg, progress)
    except (DataError, ResumeError) as e:  # raised before the first step
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0 and args.sample > 0 and cfg.model.causal:
        print(sample_text(result.model, "def ", args.sample))
    if dist.is_initialized():
        # Leave together: rank 0 hosts the rendezvous store, and a rank that tears down
        # while another still talks to it can abort ("terminate called without an active
        # exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


# --- the demo (`tdiag demo`)

DEMO_STEPS = 700


def demo_config(*, out: Path, steps: int | None, device: str, quiet: bool) -> TrainConfig:
    """Small model that learns visibly in about two minutes on a 2-core CPU."""
    return TrainConfig(
        model=ModelConfig(
            d_model=128,
            n_heads=4,
            n_layers=4,
            max_seq_len=128,
            pos_encoding="rope",
            norm="rmsnorm",
            activation="swiglu",
            bias=False,
        ),
        batch_size=16,
        steps=steps or DEMO_STEPS,
        lr=2e-3,
        warmup_steps=20,
        eval_every=100,
        eval_batches=8,
        log_every=10,
        out_dir=str(out),
        device=device,
        quiet=quiet,
    )


def demo_command(*, out: Path, steps: int | None, device: str, quiet: bool) -> int:
    """`tdiag demo`: train the reference model on the built-in corpus, with the Monitor."""
    from rich.console import Console

    console = Console()
    if steps is not None and steps <= 0:
        console.print(f"[red]error:[/] --steps must be > 0, got {steps}")
        return 2
    try:
        cfg = demo_config(out=out, steps=steps, device=device, quiet=quiet)
        check_runtime(cfg)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    try:
        moved = _set_aside_previous_run(out)
    except OSError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    if moved is not None and not quiet:
        console.print(f"moved the previous demo run to {moved}", soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mon = attach_monitor(cfg, out, quiet=quiet, watch="layers")
    if mon is not None:
        with mon:
            result = train(cfg, [mon])
    else:
        result = train(cfg, [] if quiet else [DemoProgress(cfg.steps, console)])
    if not quiet:
        console.print(
            # labelled: the Monitor's "N steps in T" is its own start to end, and the report's
            # final train loss is the last log interval's mean
            f"trained {result.steps} steps in {time.perf_counter() - t0:.0f} s (with set-up "
            f"and the report); last step's train loss {result.final_loss:.3f}, val loss "
            f"{result.val_loss:.3f}",
            soft_wrap=True,  # one line in a log too
        )
        console.rule("sample")
        console.print(sample_text(result.model, "def ", 300), markup=False, highlight=False)
        console.rule()
        console.print(f"run folder: {out}")
    return 0


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("history.jsonl", "meta.json"))


def _set_aside_previous_run(out: Path) -> Path | None:
    """A second `tdiag demo` starts a fresh run folder: the previous run moves to
    ``OUT.previous`` (the one before it, if any, is replaced), so the report is of this run
    alone rather than of two runs appended in one history. A folder that is not a run
    folder is left alone, and never deleted."""
    if not _is_run_folder(out):
        return None
    previous = out.with_name(out.name + ".previous")
    if previous.exists():
        if not _is_run_folder(previous):
            raise OSError(f"{previous} exists and is not a tdiag run folder; move it away")
        shutil.rmtree(previous)
    out.rename(previous)
    return previous


def _log_to_stderr() -> None:
    """The trainer's own messages (resumed from …, early stopping at …) as plain lines on
    stderr. Only this package's logger: the root logger stays the user's (configuring it
    would also print other libraries' INFO records, tdiag's included)."""
    log = logging.getLogger(__package__)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
