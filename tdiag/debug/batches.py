"""The batch a check runs on: the file's batch function, or random token ids.

Contract 1: the first of ``get_batch()``, ``make_batch()``, ``example_batch()`` that takes no
argument, returning token ids ``(B, L)``, a pair ``(x, y)`` (nanoGPT) or a dict with
``input_ids`` and optionally ``attention_mask``, ``labels``; else random ids whose length comes
from ``--seq-len``, the model's config or its shapes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tdiag.debug.usercode import LoadError, fail

__all__ = [
    "BATCH_NAMES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "config_value",
    "file_batch",
    "ids_out_of_range",
    "normalise_batch",
    "random_batch",
    "to_device",
]

#: Batch functions looked up, in this order.
BATCH_NAMES = ("get_batch", "make_batch", "example_batch")
#: Config attributes giving the model's context length, in this order.
SEQ_LEN_ATTRS = ("max_seq_len", "block_size", "n_positions", "max_position_embeddings")
#: Random batches when the file has no batch function.
DEFAULT_BATCH_SIZE = 4  # >= 2 so that checks comparing samples (batch.mixing) have two
DEFAULT_SEQ_LEN = 64  # Contract 1's length when the config says nothing
#: Cap on the length of a random batch read from the config: a GPT-2 config says 1024, and
#: every check runs a few forwards; 128 positions exercise the same code in a fraction of the
#: time. ``--seq-len`` overrides it.
MAX_RANDOM_SEQ_LEN = 128
#: Smallest side of a square buffer taken for a causal mask when guessing the context length.
MIN_MASK_SIDE = 8


def config_of(model: nn.Module) -> list[Any]:
    """Where a model keeps its settings: ``model.config``, ``model.cfg``, then the model."""
    return [c for c in (getattr(model, "config", None), getattr(model, "cfg", None)) if c] + [model]


def config_value(model: nn.Module, names: tuple[str, ...]) -> Any:
    """The first integer attribute among ``names`` found in :func:`config_of`, or None."""
    for cfg in config_of(model):
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _required_params(fn: Callable[..., Any]) -> list[str]:
    """Names of the parameters ``fn`` cannot be called without ([] when unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and (p.kind in kinds or p.kind is inspect.Parameter.KEYWORD_ONLY)
    ]


def file_batch(module: ModuleType, path: Path) -> tuple[Any, str] | None:
    """The first batch function of the file that takes no argument, called; None if the
    file has none. One that needs arguments (nanoGPT's ``get_batch(split)``) is passed over
    for the next name; if only such ones exist, a LoadError says how to provide a batch."""
    needs_args: list[str] = []
    for name in BATCH_NAMES:
        fn = getattr(module, name, None)
        if not callable(fn):
            continue
        required = _required_params(fn)
        if required:
            needs_args.append(f"{name}({', '.join(required)})")
            continue
        try:
            return fn(), name
        except (Exception, SystemExit) as exc:  # user code
            raise fail(
                "batch-raised",
                f"cannot get a batch: {name}() in {path.name} raised {type(exc).__name__}: {exc}.",
                exc,
                path,
            ) from None
    if needs_args:
        raise LoadError(
            f"cannot get a batch: {needs_args[0]} in {path.name} takes arguments, and tdiag "
            "calls the batch function with none. Add one that takes none, e.g. "
            f"`def example_batch(): return {needs_args[0].split('(')[0]}('train')`.",
            cause="bad-batch",
        )
    return None


def normalise_batch(raw: Any, source: str, path: Path) -> tuple[dict[str, Any], str]:
    where = f"{source}() in {path.name}"
    if isinstance(raw, torch.Tensor):
        batch, style = {"input_ids": raw}, "tensor"
    elif isinstance(raw, Mapping) and isinstance(raw.get("input_ids"), torch.Tensor):
        batch, style = dict(raw), "dict"
    elif (
        isinstance(raw, tuple | list)
        and len(raw) == 2
        and all(isinstance(t, torch.Tensor) for t in raw)
        and raw[0].shape == raw[1].shape
    ):
        # nanoGPT's get_batch returns (x, y): y[t] is the token after x[t]
        batch, style = {"input_ids": raw[0], "targets": raw[1]}, "tuple"
    else:
        raise LoadError(
            f"bad batch: {where} returned {_describe(raw)}; return a LongTensor of token ids "
            "(B, L), a pair (input_ids, targets) of such tensors, or a dict with 'input_ids' "
            "(and optionally 'attention_mask', 'labels').",
            cause="bad-batch",
        )
    meta = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise LoadError(
            f"bad batch: {', '.join(meta)} from {where} are on the meta device: they have no "
            "values; return tensors on cpu (or the model's device).",
            cause="bad-batch",
        )
    ids = batch["input_ids"]
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise LoadError(
            f"bad batch: input_ids from {where} have dtype {ids.dtype}; token ids must be "
            "integers (torch.long). Did you pass embeddings or forget .long()?",
            cause="bad-batch",
        )
    if ids.dim() != 2 or ids.numel() == 0:
        raise LoadError(
            f"bad batch: input_ids from {where} have shape {tuple(ids.shape)}; expected (B, L) "
            "with at least one sample and one token.",
            cause="bad-batch",
        )
    for key in ("attention_mask", "labels", "targets"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ids.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LoadError(
                f"bad batch: {key} from {where} is {shape}; expected a tensor of the shape of "
                f"input_ids {tuple(ids.shape)}.",
                cause="bad-batch",
            )
        if key != "attention_mask" and t is not None and (t.is_floating_point() or t.is_complex()):
            raise LoadError(
                f"bad batch: {key} from {where} have dtype {t.dtype}; target ids must be integers "
                "(torch.long), with -100 where there is no target.",
                cause="bad-batch",
            )
    return batch, style


def _describe(raw: Any) -> str:
    if isinstance(raw, tuple | list):
        inner = ", ".join(
            f"Tensor{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            for t in raw[:4]
        )
        return f"a {type(raw).__name__} ({inner}{', ...' if len(raw) > 4 else ''})"
    return type(raw).__name__


def random_batch(
    model: nn.Module,
    vocab: int | None,
    batch_size: int | None,
    seq_len: int | None,
    seed: int,
    pad_id: int | None,
    path: Path,
) -> dict[str, Any]:
    if vocab is None:
        raise LoadError(
            f"cannot draw a random batch for {path.name}: the model has no nn.Embedding and no "
            "config.vocab_size. Define get_batch() returning token ids (B, L).",
            cause="no-vocab",
        )
    if seq_len is None:
        found = config_value(model, SEQ_LEN_ATTRS) or _context_length(model, vocab)
        seq_len = min(found, MAX_RANDOM_SEQ_LEN) if found else DEFAULT_SEQ_LEN
    else:
        _check_capacity(model, vocab, seq_len, path)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size or DEFAULT_BATCH_SIZE, seq_len), generator=gen)
    if pad_id is not None and 0 <= pad_id < vocab and vocab > 1:
        ids = torch.where(ids == pad_id, (ids + 1) % vocab, ids)  # no padding in a random batch
    return {"input_ids": ids}


def _check_capacity(model: nn.Module, vocab: int | None, seq_len: int, path: Path) -> None:
    """``--seq-len`` longer than the positions the model has (its config's length, else the
    rows of its position table or the side of its mask buffer) is a clear error before any
    forward, not an ``IndexError`` from inside the embedding."""
    from_config = config_value(model, SEQ_LEN_ATTRS)
    capacity = from_config or _context_length(model, vocab)
    if capacity is None or seq_len <= capacity:
        return
    source = (
        f"its config says {capacity} ({'/'.join(SEQ_LEN_ATTRS)})"
        if from_config
        else f"its position table (or causal-mask buffer) has {capacity} rows"
    )
    raise LoadError(
        f"--seq-len {seq_len} is longer than the model in {path.name} can take: {source}. "
        f"Pass --seq-len {capacity} or less, or build the model with a longer context.",
        cause="bad-option",
    )


def _context_length(model: nn.Module, vocab: int | None) -> int | None:
    """The context length a model without a config reveals by its shapes: the rows of a
    position-embedding table (an ``nn.Embedding`` named like ``pos``/``wpe``, or a parameter
    ``(L, d)`` / ``(1, L, d)`` so named) or the side of
    a square mask buffer ``(..., n, n)`` (a causal mask built for ``block_size``). The
    smallest such length, or None."""
    found = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        is_table = isinstance(m, nn.Embedding) and m.num_embeddings != vocab
        if is_table and ("pos" in leaf or leaf in ("wpe", "pe")):
            found.append(m.num_embeddings)
    for name, prm in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1].lower()
        if prm.dim() in (2, 3) and ("pos" in leaf or leaf == "wpe"):  # nn.Parameter(L, d)
            found.append(int(prm.shape[-2]))
    for _, b in model.named_buffers():
        # a square buffer smaller than MIN_MASK_SIDE is more likely a small matrix than a mask
        if (
            b.dim() >= 2
            and b.shape[-1] == b.shape[-2] >= MIN_MASK_SIDE
            and b.numel() == b.shape[-1] ** 2
        ):
            found.append(int(b.shape[-1]))
    return min(found) if found else None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ids_out_of_range(batch: Mapping[str, Any], vocab: int | None) -> bool:
    """True when ``input_ids`` hold ids outside ``[0, vocab)`` (one host sync)."""
    if vocab is None:
        return False
    ids = batch["input_ids"]
    lo, hi = torch.aminmax(ids)
    return bool(lo.item() < 0 or hi.item() >= vocab)  # host sync
