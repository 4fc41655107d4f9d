"""Load a user's model file (Contract 1 in DESIGN.md) into a :class:`CheckContext`.

Every way a file can fail to load or run becomes a :class:`LoadError` whose message names
the cause in one paragraph and shows only the user's own frames of the traceback (never
tdiag's or torch's internals). ``tdiag check`` turns a LoadError into exit code 2.

The batch (:mod:`tdiag.debug.batches`) and the errors and deadline
(:mod:`tdiag.debug.usercode`) live in their own modules; their public names are
re-exported here.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tdiag.debug.batches import (
    BATCH_NAMES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEQ_LEN,
    config_of,
    config_value,
    file_batch,
    ids_out_of_range,
    normalise_batch,
    random_batch,
    to_device,
)
from tdiag.debug.context import (
    TARGET_PARAM_NAMES,
    CheckContext,
    ModelOutputError,
    forward_params,
    logits_from_output,
    loss_from_output,
)
from tdiag.debug.probes import fastpath_off
from tdiag.debug.usercode import LoadError, deadline, fail, parse_target, user_traceback

__all__ = [
    "BATCH_NAMES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "FACTORY_NAMES",
    "LoadError",
    "deadline",
    "load_target",
    "parse_target",
    "user_traceback",
]

logger = logging.getLogger(__name__)

#: Factories looked up, in this order, when the target names none (Contract 1).
FACTORY_NAMES = ("build_model", "get_model", "create_model")
# -- target and import -----------------------------------------------------------------------


def _package_name(path: Path) -> str | None:
    """Dotted module name when the file lies in a package (folders with __init__.py)."""
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts) if len(parts) > 1 else None


def import_user_file(path: Path) -> ModuleType:
    """Execute the file as a module, its own folder first on ``sys.path`` (and, when it is
    part of a package, the package root too, so that relative imports work).

    Raises:
        LoadError: missing-file, not-python, syntax-error or import-error.
    """
    if not path.exists():
        raise LoadError(f"cannot load {path}: the file does not exist.", cause="missing-file")
    if path.is_dir() or path.suffix != ".py":
        raise LoadError(
            f"cannot load {path}: expected a Python file PATH.py[:FACTORY].", cause="not-python"
        )
    path = path.resolve()
    dotted = _package_name(path)
    for folder in (path.parent, *([path.parents[dotted.count(".")]] if dotted else [])):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    name = dotted or f"tdiag_user_{path.stem}"
    existing = sys.modules.get(name)
    if dotted and existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing  # already imported as part of its package: reuse, as Python would
    loaded = False
    try:
        if dotted:
            importlib.import_module(dotted.rpartition(".")[0])  # parent packages
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
        loaded = True
    except SyntaxError as exc:
        raise fail(
            "syntax-error",
            f"cannot load {path.name}: it has a syntax error (line {exc.lineno}): {exc.msg}.",
            exc,
            path,
        ) from None
    except ImportError as exc:
        raise fail(
            "import-error",
            f"cannot load {path.name}: an import inside it failed: {exc}. Install the missing "
            "package or fix the import; the file's own folder is on sys.path.",
            exc,
            path,
        ) from None
    except SystemExit as exc:  # e.g. argparse at module level, seeing tdiag's own arguments
        raise fail(
            "exit-called",
            f"cannot load {path.name}: the file called sys.exit({exc.code!r}) while being "
            "imported (argparse or a training script at module level?). Put that code under "
            "`if __name__ == '__main__':` so that importing the file only defines the model.",
            exc,
            path,
        ) from None
    except Exception as exc:  # the user's module-level code raised: any type is possible
        raise fail(
            "import-error",
            f"cannot load {path.name}: running the file raised {type(exc).__name__}: {exc}.",
            exc,
            path,
        ) from None
    finally:
        if not loaded:
            sys.modules.pop(name, None)  # no half-initialised module left behind
    return module


# -- model, batch, context -------------------------------------------------------------------


def _find_factory(
    module: ModuleType, factory: str | None, path: Path
) -> tuple[Callable[[], nn.Module] | None, nn.Module | None, str]:
    if factory is not None:
        fn = getattr(module, factory, None)
        if not callable(fn):
            raise LoadError(
                f"cannot load {path.name}: it defines no callable {factory!r} (named after ':' "
                "in the target).",
                cause="no-factory",
            )
        return fn, None, factory
    for name in FACTORY_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn, None, name
    model = getattr(module, "model", None)
    if isinstance(model, nn.Module):
        return None, model, "model"
    raise LoadError(
        f"cannot load {path.name}: found no model in it. Define one of "
        f"{', '.join(n + '()' for n in FACTORY_NAMES)} returning an nn.Module, or a module-level "
        "`model`, or name the factory: tdiag check PATH.py:FACTORY.",
        cause="no-factory",
    )


def _build(fn: Callable[[], Any], name: str, path: Path, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    try:
        model = fn()
    except SystemExit as exc:
        raise fail(
            "exit-called",
            f"cannot build the model: {name}() in {path.name} called sys.exit({exc.code!r}).",
            exc,
            path,
        ) from None
    except Exception as exc:  # user code: any exception type
        raise fail(
            "factory-raised",
            f"cannot build the model: {name}() in {path.name} raised {type(exc).__name__}: {exc}.",
            exc,
            path,
        ) from None
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"cannot build the model: {name}() in {path.name} returned "
            f"{type(model).__name__}, not a torch.nn.Module.",
            cause="not-a-module",
        )
    return model


def _vocab_size(model: nn.Module) -> int | None:
    v = config_value(model, ("vocab_size",))
    if v is not None:
        return v
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _pad_id(model: nn.Module) -> int | None:
    v = config_value(model, ("pad_id", "pad_token_id"))
    if v is not None:
        return v
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.padding_idx if emb is not None else None


def _causal(module: ModuleType, model: nn.Module, no_causal: bool) -> bool:
    if no_causal:
        return False
    flag = getattr(module, "CAUSAL", None)
    if isinstance(flag, bool):
        return flag
    for cfg in config_of(model):
        c = getattr(cfg, "causal", None)
        if isinstance(c, bool):
            return c
    # Hugging Face models say whether they generate text (decoders) or not (BERT-style
    # encoders), through a public method
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        try:
            flag = can_generate()
        except (TypeError, AttributeError, NotImplementedError):  # a user method of that name
            flag = None
        if isinstance(flag, bool):
            return flag
    return True


def _on_meta_device(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that are meta tensors (shapes, no values)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_meta]


def _to_device(model: nn.Module, dev: torch.device, path: Path) -> nn.Module:
    """``model.to(dev).eval()``; a model without values (built on the meta device) or one
    that cannot be moved is a LoadError."""
    meta = _on_meta_device(model)
    if meta:
        n = len([*model.parameters(), *model.buffers()])
        raise LoadError(
            f"cannot check the model of {path.name}: the model's parameters are on the meta "
            f"device: they have no values ({len(meta)} of its {n} parameters and buffers, "
            f"e.g. {meta[0]}); build it on cpu, or materialise it with to_empty() + init / "
            "load_state_dict before checking.",
            cause="meta-device",
        )
    try:
        return model.to(dev).eval()
    except Exception as exc:  # user code (a custom _apply/to), or out of device memory
        raise fail(
            "to-device",
            f"cannot move the model of {path.name} to {dev}: {type(exc).__name__}: {exc}.",
            exc,
            path,
        ) from None


def load_target(
    target: str,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    no_causal: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> CheckContext:
    """Import the file, build the model and a batch, run one validating forward.

    Args:
        on_phase: called with what starts next ("importing model.py", "building the model
            (build_model() in model.py)", ...), phrased to follow "while": ``tdiag check``
            names it when the file hangs or ends the process.

    Returns:
        A CheckContext. When the batch holds token ids outside the vocabulary, the validating
        forward is not run (it would crash in the embedding) and ``ctx.cache["blocked"]``
        says why: only the data checks can run.

    Raises:
        LoadError: the file cannot be loaded or run (see ``LoadError.cause``).
    """
    phase = on_phase or (lambda what: None)
    path, factory_name = parse_target(target)
    phase(f"importing {path.name}")
    module = import_user_file(path)
    factory, model, name = _find_factory(module, factory_name, path)
    if factory is not None:
        phase(f"building the model ({name}() in {path.name})")
        model = _build(factory, name, path, seed)
    assert model is not None
    dev = torch.device(device)
    phase(f"moving the model to {dev}")
    model = _to_device(model, dev, path)
    vocab = _vocab_size(model)
    pad_id = _pad_id(model)
    phase(f"getting the batch from {path.name}")
    found = file_batch(module, path)
    if found is not None:
        raw, source = found
        batch, style = normalise_batch(raw, source, path)
    else:
        batch, style = (
            random_batch(model, vocab, batch_size, seq_len, seed, pad_id, path),
            "tensor",
        )
    ctx = CheckContext(
        model=model,
        batch=to_device(batch, dev),
        vocab_size=vocab,
        causal=_causal(module, model, no_causal),
        device=dev,
        seed=seed,
        user_module=module,
        decode_with_cache=_callable(module, "decode_with_cache"),
        make_optimizer=_callable(module, "make_optimizer"),
        loss_fn=_callable(module, "loss_fn"),
        factory=factory,
        batch_style=style,
        pad_id=pad_id,
        batch_from_file=found is not None,
    )
    limit = ctx.token_limit()
    if ids_out_of_range(ctx.batch, limit):
        ctx.cache["blocked"] = (
            f"the batch holds token ids outside [0, {limit}); fix the data first "
            "(see data.token-out-of-range)"
        )
        return ctx
    if _labels_out_of_range(ctx, vocab):  # a model computing its own loss would crash on them
        return ctx
    note = ""
    if found is None and seq_len is None:
        note = (
            "; a random batch: if the model takes fewer tokens, pass --seq-len N (or give it a "
            "config with max_seq_len / block_size)"
        )
    phase(f"running the model's first forward pass and loss ({_call_shape(ctx)})")
    with fastpath_off(ctx.model):  # the path the checks take (see tdiag.debug.probes.fastpath_off)
        validate_forward(ctx, path, length_note=note)
    return ctx


def _callable(module: ModuleType, name: str) -> Callable[..., Any] | None:
    fn = getattr(module, name, None)
    return fn if callable(fn) else None


def _targets_param(model: nn.Module) -> str | None:
    """The forward parameter, after the ids, that takes targets (``forward(idx, targets=None)``)."""
    params = forward_params(model)
    return next((p.name for p in (params or [])[1:] if p.name in TARGET_PARAM_NAMES), None)


def _call_shape(ctx: CheckContext) -> str:
    extra = f", {ctx.targets_arg}=next-token ids" if ctx.targets_arg else ""
    call = "model(**batch" if ctx.batch_style == "dict" else "model(input_ids"
    return f"{call}{extra})"


def validate_forward(ctx: CheckContext, path: Path, *, length_note: str = "") -> None:
    """Run the model once on the batch, and the loss; turn a crash or a bad output into a
    LoadError.

    A forward that returns the logits of fewer positions than it was given (nanoGPT returns
    only the last one when called without targets) is called again with next-token targets
    when it has a parameter for them (:data:`~tdiag.debug.context.TARGET_PARAM_NAMES`); the
    checks then always pass them (``ctx.targets_arg``). When that call raises, the error is
    the user's exception with their frames, and says why the targets were passed.

    Args:
        length_note: said after a forward crash, e.g. where the random batch's length came from.
    """
    torch.manual_seed(ctx.seed)
    without: str | None = None  # what the forward returned without targets, when retried
    try:
        with torch.no_grad():
            out = ctx.call_model()
            try:
                logits = ctx._checked_logits(out, ctx.batch)
            except ModelOutputError as first:
                name = _targets_param(ctx.model)
                if name is None or ctx.targets_arg is not None:
                    raise
                ctx.targets_arg, without = name, _logits_shape(out)
                out = ctx.call_model()  # raising here: the user's error, reported below
                try:
                    logits = ctx._checked_logits(out, ctx.batch)
                except ModelOutputError:  # the targets did not help: report the first problem
                    ctx.targets_arg = None
                    raise first from None
                logger.info("forward returns all positions only with %s=...; passing them", name)
    except ModelOutputError as exc:
        raise LoadError(
            f"unexpected output from the model in {path.name}: {exc}. (Called as "
            f"{_call_shape(ctx)} with input_ids of shape {tuple(ctx.input_ids.shape)}.)",
            cause="bad-output",
        ) from None
    except Exception as exc:  # user code
        raise _forward_raised(ctx, exc, path, length_note, without) from None
    ctx.cache["logits_shape"] = tuple(logits.shape)
    _targets_needed_without_them(ctx)
    if _labels_out_of_range(ctx, logits.shape[-1]):
        return
    validate_loss(ctx, out, logits, path)


def _forward_raised(
    ctx: CheckContext, exc: Exception, path: Path, length_note: str, without: str | None
) -> LoadError:
    """The LoadError of a forward that raised, with the user's frames. ``without``: what the
    forward returned without targets when the call that raised was the retry with them."""
    why = ""
    if without is not None:
        why = (
            f": without {ctx.targets_arg} it returns {without}, not the logits of every "
            "position, so tdiag passes them as a training loop does"
        )
    return fail(
        "forward-raised",
        f"the model's forward pass raised {type(exc).__name__}: {str(exc).rstrip('.')}. "
        f"(Called as {_call_shape(ctx)} with input_ids of shape {tuple(ctx.input_ids.shape)}"
        f"{why}{length_note}.)",
        exc,
        path,
    )


def _logits_shape(out: Any) -> str:
    """What a model output holds, for a message: "logits of shape (4, 1, 40)"."""
    try:
        return f"logits of shape {tuple(logits_from_output(out).shape)}"
    except ModelOutputError:
        return f"a {type(out).__name__} without logits"


def _targets_needed_without_them(ctx: CheckContext) -> None:
    """A dict batch ``{"input_ids", "targets"}`` for a nanoGPT-style forward: the checks
    that build their own batches (without targets) must pass targets too, or they get
    the last position only. Sets ``ctx.targets_arg`` then."""
    if ctx.batch_style != "dict" or ctx.targets_arg is not None or "targets" not in ctx.batch:
        return
    if _targets_param(ctx.model) != "targets":
        return
    bare = {k: v for k, v in ctx.batch.items() if k != "targets"}
    try:
        with torch.no_grad():
            ctx.forward(bare)
    except ModelOutputError:
        ctx.targets_arg = "targets"
    except Exception:  # user code: a model that needs its targets; the checks will say
        logger.info("forward fails without targets", exc_info=True)


def _labels_out_of_range(ctx: CheckContext, n_out: int | None) -> bool:
    """True (and the forward checks blocked) when labels lie outside ``[0, n_out)`` and are
    not -100: cross-entropy would crash on them, data.token-out-of-range reports them."""
    labels = ctx.batch.get("labels")
    if labels is None or n_out is None:
        return False
    bad = (labels != -100) & ((labels < 0) | (labels >= n_out))
    if not bool(bad.any()):  # host sync
        return False
    ctx.cache["blocked"] = (
        f"the batch holds labels outside [0, {n_out}); fix the data first "
        "(see data.token-out-of-range)"
    )
    return True


def validate_loss(ctx: CheckContext, out: Any, logits: torch.Tensor, path: Path) -> None:
    """Compute the training loss once (the file's ``loss_fn``, else the output's loss, else
    cross-entropy); a crash or a non-scalar result is a LoadError."""
    loss: Any = None
    what = f"loss_fn(model, batch) in {path.name}"
    try:
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            if ctx.loss_fn is not None:
                loss = ctx.loss_fn(ctx.model, ctx.model_inputs())
            else:
                loss = loss_from_output(out)
                what = "the model's own loss (its output's .loss)"
                if loss is None:
                    what = "next-token cross-entropy on the logits"
                    loss = ctx.default_loss(logits)
    except Exception as exc:  # user code
        raise fail(
            "loss-raised",
            f"computing the loss raised {type(exc).__name__}: {exc} (the loss is {what}).",
            exc,
            path,
        ) from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (
            f"a tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise LoadError(
            f"bad loss: {what} gave {got}; the loss must be a one-element tensor (the mean "
            "over tokens), still attached to the graph (no .item()).",
            cause="bad-loss",
        )
