"""Load a user's model file (Contract 1 in DESIGN.md) into a :class:`CheckContext`.

Every way a file can fail to load or run becomes a :class:`LoadError` whose message names
the cause in one paragraph and shows only the user's own frames of the traceback (never
tdiag's or torch's internals). ``tdiag check`` turns a LoadError into exit code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import torch
from torch import nn

from tdiag.debug.context import CheckContext, ModelOutputError
from tdiag.findings import TdiagError

__all__ = [
    "BATCH_NAMES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEQ_LEN",
    "FACTORY_NAMES",
    "LoadError",
    "deadline",
    "load_target",
    "parse_target",
]

logger = logging.getLogger(__name__)

#: Factories looked up, in this order, when the target names none (Contract 1).
FACTORY_NAMES = ("build_model", "get_model", "create_model")
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


class LoadError(TdiagError):
    """The model file could not be loaded or run.

    Attributes:
        cause: a short stable key: missing-file, not-python, syntax-error, import-error,
            no-factory, factory-raised, not-a-module, no-vocab, batch-raised, bad-batch,
            forward-raised, bad-output, timeout, bad-device.
        message: one paragraph naming the cause.
        user_traceback: the user's frames of the traceback ("" when none).
    """

    def __init__(self, message: str, *, cause: str, user_traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.user_traceback = user_traceback

    def __str__(self) -> str:
        if self.user_traceback:
            return f"{self.message}\n\n{self.user_traceback.rstrip()}"
        return self.message


class _Alarm(BaseException):
    """Raised by the SIGALRM handler. A BaseException so that a user's ``except Exception``
    inside a looping forward cannot swallow it."""


# -- traceback filtering ---------------------------------------------------------------------


def _is_user_frame(filename: str, user_dir: Path) -> bool:
    try:
        p = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    parts = set(p.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    tdiag_dir = Path(__file__).resolve().parent
    if tdiag_dir in p.parents:
        return False
    return user_dir in p.parents


def user_traceback(exc: BaseException, user_file: Path) -> str:
    """The frames of ``exc``'s traceback (and its causes) that lie in the user's folder,
    plus the exception line; "" when none."""
    user_dir = user_file.resolve().parent
    lines: list[str] = []
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if _is_user_frame(f.filename, user_dir)
    ]
    if frames:
        lines.append("Traceback (your code only):\n")
        lines.extend(traceback.format_list(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines).rstrip()


def _fail(cause: str, message: str, exc: BaseException | None, user_file: Path) -> LoadError:
    tb = user_traceback(exc, user_file) if exc is not None else ""
    return LoadError(message, cause=cause, user_traceback=tb)


# -- target and import -----------------------------------------------------------------------


def parse_target(target: str) -> tuple[Path, str | None]:
    """Split ``PATH.py[:FACTORY]`` into the path and the factory name (or None)."""
    path, sep, factory = target.rpartition(":")
    if sep and factory.isidentifier() and path:
        return Path(path), factory
    return Path(target), None


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
        raise _fail(
            "syntax-error",
            f"cannot load {path.name}: it has a syntax error (line {exc.lineno}): {exc.msg}.",
            exc,
            path,
        ) from None
    except ImportError as exc:
        raise _fail(
            "import-error",
            f"cannot load {path.name}: an import inside it failed: {exc}. Install the missing "
            "package or fix the import; the file's own folder is on sys.path.",
            exc,
            path,
        ) from None
    except Exception as exc:  # the user's module-level code raised: any type is possible
        raise _fail(
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
    except Exception as exc:  # user code: any exception type
        raise _fail(
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


def _config_of(model: nn.Module) -> list[Any]:
    return [c for c in (getattr(model, "config", None), getattr(model, "cfg", None)) if c] + [model]


def _config_value(model: nn.Module, names: tuple[str, ...]) -> Any:
    for cfg in _config_of(model):
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _vocab_size(model: nn.Module) -> int | None:
    v = _config_value(model, ("vocab_size",))
    if v is not None:
        return v
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _pad_id(model: nn.Module) -> int | None:
    v = _config_value(model, ("pad_id", "pad_token_id"))
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
    for cfg in _config_of(model):
        c = getattr(cfg, "causal", None)
        if isinstance(c, bool):
            return c
    return True


def _file_batch(module: ModuleType, path: Path) -> tuple[Any, str] | None:
    for name in BATCH_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            try:
                return fn(), name
            except Exception as exc:  # user code
                raise _fail(
                    "batch-raised",
                    f"cannot get a batch: {name}() in {path.name} raised "
                    f"{type(exc).__name__}: {exc}.",
                    exc,
                    path,
                ) from None
    return None


def _normalise_batch(raw: Any, source: str, path: Path) -> tuple[dict[str, Any], str]:
    where = f"{source}() in {path.name}"
    if isinstance(raw, torch.Tensor):
        batch, style = {"input_ids": raw}, "tensor"
    elif isinstance(raw, Mapping) and isinstance(raw.get("input_ids"), torch.Tensor):
        batch, style = dict(raw), "dict"
    else:
        raise LoadError(
            f"bad batch: {where} returned {type(raw).__name__}; return a LongTensor of token "
            "ids (B, L) or a dict with 'input_ids' (and optionally 'attention_mask', 'labels').",
            cause="bad-batch",
        )
    ids = batch["input_ids"]
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise LoadError(
            f"bad batch: input_ids from {where} have dtype {ids.dtype}; token ids must be "
            "integers (torch.long). Did you pass embeddings or forget .long()?",
            cause="bad-batch",
        )
    if ids.dim() != 2:
        raise LoadError(
            f"bad batch: input_ids from {where} have shape {tuple(ids.shape)}; expected (B, L).",
            cause="bad-batch",
        )
    for key in ("attention_mask", "labels"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ids.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LoadError(
                f"bad batch: {key} from {where} is {shape}; expected a tensor of the shape of "
                f"input_ids {tuple(ids.shape)}.",
                cause="bad-batch",
            )
    return batch, style


def _random_batch(
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
        found = _config_value(model, SEQ_LEN_ATTRS)
        seq_len = min(found, MAX_RANDOM_SEQ_LEN) if found else DEFAULT_SEQ_LEN
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size or DEFAULT_BATCH_SIZE, seq_len), generator=gen)
    if pad_id is not None and 0 <= pad_id < vocab and vocab > 1:
        ids = torch.where(ids == pad_id, (ids + 1) % vocab, ids)  # no padding in a random batch
    return {"input_ids": ids}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ids_out_of_range(batch: Mapping[str, Any], vocab: int | None) -> bool:
    """True when ``input_ids`` hold ids outside ``[0, vocab)`` (one host sync)."""
    if vocab is None:
        return False
    ids = batch["input_ids"]
    lo, hi = torch.aminmax(ids)
    return bool(lo.item() < 0 or hi.item() >= vocab)  # host sync


def load_target(
    target: str,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    no_causal: bool = False,
) -> CheckContext:
    """Import the file, build the model and a batch, run one validating forward.

    Returns:
        A CheckContext. When the batch holds token ids outside the vocabulary, the validating
        forward is not run (it would crash in the embedding) and ``ctx.cache["blocked"]``
        says why: only the data checks can run.

    Raises:
        LoadError: the file cannot be loaded or run (see ``LoadError.cause``).
    """
    path, factory_name = parse_target(target)
    module = import_user_file(path)
    factory, model, name = _find_factory(module, factory_name, path)
    if factory is not None:
        model = _build(factory, name, path, seed)
    assert model is not None
    dev = torch.device(device)
    model = model.to(dev).eval()
    vocab = _vocab_size(model)
    pad_id = _pad_id(model)
    found = _file_batch(module, path)
    if found is not None:
        raw, source = found
        batch, style = _normalise_batch(raw, source, path)
    else:
        batch, style = (
            _random_batch(model, vocab, batch_size, seq_len, seed, pad_id, path),
            "tensor",
        )
    ctx = CheckContext(
        model=model,
        batch=_to_device(batch, dev),
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
    validate_forward(ctx, path)
    return ctx


def _callable(module: ModuleType, name: str) -> Callable[..., Any] | None:
    fn = getattr(module, name, None)
    return fn if callable(fn) else None


def validate_forward(ctx: CheckContext, path: Path) -> None:
    """Run the model once on the batch; turn a crash or a bad output into a LoadError."""
    try:
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            logits = ctx.forward()
    except ModelOutputError as exc:
        raise LoadError(
            f"unexpected output from the model in {path.name}: {exc}.", cause="bad-output"
        ) from None
    except Exception as exc:  # user code
        raise _fail(
            "forward-raised",
            f"the model's forward pass raised {type(exc).__name__}: {exc}. (Called as "
            f"{'model(input_ids)' if ctx.batch_style == 'tensor' else 'model(**batch)'} with "
            f"input_ids of shape {tuple(ctx.input_ids.shape)}.)",
            exc,
            path,
        ) from None
    ctx.cache["logits_shape"] = tuple(logits.shape)


# -- timeout ---------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(
    seconds: float | None,
    *,
    user_file: Path | None = None,
    what: Callable[[], str] = lambda: "running the checks",
) -> Iterator[None]:
    """Raise ``LoadError(cause="timeout")`` when the block runs longer than ``seconds``.

    Uses SIGALRM in the main thread: it stops Python-level code (a forward that loops
    forever). Limitation: a single long native call (one huge matmul, a blocking CUDA
    kernel) is interrupted only when it returns to Python; outside the main thread or on
    platforms without SIGALRM no deadline is enforced (logged).
    """
    usable = (
        seconds is not None
        and seconds > 0
        and math.isfinite(seconds)
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        if seconds:
            logger.info("no timeout enforced (not the main thread, or no SIGALRM here)")
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    except _Alarm as exc:
        raise LoadError(
            f"stopped after {seconds:g} s (--timeout) while {what()}; a forward "
            "pass that never returns (an endless loop?) is the usual cause.",
            cause="timeout",
            user_traceback=_where_stuck(exc, user_file),
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # an enclosing timer (pytest-timeout, the caller's): give it back
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), outer_interval)


def _where_stuck(exc: BaseException, user_file: Path | None) -> str:
    if user_file is None:
        return ""
    user_dir = user_file.resolve().parent
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if _is_user_frame(f.filename, user_dir) and f.name != "on_alarm"
    ]
    if not frames:
        return ""
    return "Where it was running (your code only):\n" + "".join(traceback.format_list(frames[-5:]))
