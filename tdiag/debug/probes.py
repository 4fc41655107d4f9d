"""Probing machinery shared by the gradient, structure, attention and sanity checks.

- :func:`controlled` runs the model in a chosen train/eval mode with a fixed RNG and puts
  every module's mode and every buffer (BatchNorm running stats, ...) back afterwards.
- :func:`fastpath_off` keeps PyTorch's MultiheadAttention / TransformerEncoder "fast path"
  (native kernels, nested tensors for padded batches) off while the checks run.
- :class:`EmbeddingPerturbation` adds noise to chosen (sample, position) entries of the
  token-embedding output through a forward hook, so a check can ask "does the output here
  depend on the input there?" of any model that has an ``nn.Embedding``.
- :func:`first_divergent_module` repeats a forward with and without a perturbation and
  names the first module (execution order) whose output changed in a region that should
  not have changed while its inputs there had not: the module that introduces the
  dependence.
- :func:`clean_batch` a batch without padding (structure checks compare real positions).
- :func:`training_copy` a copy of the model to train (``train.cannot-overfit``,
  ``data.label-leak``), so the user's model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdiag.hooks import first_float_tensor

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

__all__ = [
    "EmbeddingPerturbation",
    "changed",
    "clean_batch",
    "controlled",
    "fastpath_off",
    "first_divergent_module",
    "region_values",
    "relative_change",
    "seeded",
    "training_copy",
]

logger = logging.getLogger(__name__)

#: Relative change (max |a-b| / max |a|) above which an output "depends" on a perturbed
#: input. A model that does not depend on it gives exactly 0 in float32 (masked scores
#: become exact zeros after softmax); 1e-4 leaves room for reduction-order noise on GPUs
#: while a real dependence, even through one attention weight of 1/L, moves outputs by
#: ~1e-2 or more under the perturbation below.
CHANGE_RTOL = 1e-4

#: Perturbation added to embeddings, in units of the embedding output's RMS.
PERTURB_SCALE = 1.0

#: The dropout layers ``controlled(..., dropout=False)`` switches off.
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the RNG seeded to ``seed``; the global RNG state (CPU and the
    current CUDA device) is put back afterwards (``torch.random.fork_rng``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def controlled(model: nn.Module, *, train: bool, seed: int, dropout: bool = True) -> Iterator[None]:
    """Run ``model`` in train (``train=True``) or eval mode with a seeded RNG; restore after.

    Every module's ``training`` flag and every buffer are put back, so BatchNorm running
    statistics updated by a train-mode forward do not leak into the user's model. The
    global RNG state is restored too.

    Args:
        dropout: with ``train=True``, False puts the ``nn.Dropout*`` modules in eval mode (the
            rest stays in train mode: BatchNorm uses batch statistics). Functional dropout
            (``F.dropout(x, training=self.training)``, SDPA's ``dropout_p``) still draws from
            the RNG, seeded identically for every forward a check compares.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with seeded(seed):
        model.train(train)
        if not dropout:
            for m in model.modules():
                if isinstance(m, DROPOUT_MODULES):
                    m.eval()
        try:
            yield
        finally:
            for m, was in modes:
                m.training = was
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


@contextlib.contextmanager
def fastpath_off(model: nn.Module | None = None) -> Iterator[None]:
    """PyTorch's MHA fast path off for the block (``torch.backends.mha``), restored after.

    In eval mode without gradients, ``nn.TransformerEncoder`` given a
    ``src_key_padding_mask`` turns its input into a nested tensor, and its layers and
    ``nn.MultiheadAttention`` run fused native kernels. The checks run the model in eval mode
    under ``no_grad``: nested tensors have no statistics (the activation hooks could record
    nothing) and a layer takes the native path only when no hook is attached, so two
    forwards a check compares would not run the same code. The math path gives the same
    outputs at real tokens.

    Args:
        model: its ``nn.TransformerEncoder`` modules also get ``use_nested_tensor = False``
            for the block (restored after): the only switch on a torch without
            ``torch.backends.mha`` (before 2.3).
    """
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)] if model else []
    nested = [(m, m.use_nested_tensor) for m in encoders if hasattr(m, "use_nested_tensor")]
    try:
        from torch.backends import mha
    except ImportError:  # older torch: no global switch
        mha = None
    before = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        for m, _ in nested:
            m.use_nested_tensor = False
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(before)
        for m, was in nested:
            m.use_nested_tensor = was


def clean_batch(ctx: CheckContext, *, max_batch: int | None = None) -> dict[str, torch.Tensor]:
    """``ctx.batch`` without padding and labels: mask all ones, pad ids replaced by
    other ids, at least 2 samples (a second one is made by rolling the first)."""
    ids = ctx.input_ids.clone()
    if ids.shape[0] < 2:
        ids = torch.cat([ids, ids.roll(1, dims=1)], dim=0)
    if max_batch is not None:
        ids = ids[:max_batch]
    if ctx.pad_id is not None:
        vocab = ctx.vocab_size or int(ids.max()) + 2
        repl = (ids + 1) % vocab
        repl = torch.where(repl == ctx.pad_id, (repl + 1) % vocab, repl)
        ids = torch.where(ids == ctx.pad_id, repl, ids)
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    if ctx.attention_mask is not None:
        batch["attention_mask"] = torch.ones_like(ids, dtype=ctx.attention_mask.dtype)
    return batch


def training_copy(ctx: CheckContext) -> nn.Module:
    """A copy of the model as it is now (same weights), in train mode with dropout off (the
    checks that train ask about capacity and targets, not regularisation); rebuilt by the
    file's factory when it cannot be deep-copied."""
    try:
        model = copy.deepcopy(ctx.model)
    except (TypeError, RuntimeError, copy.Error) as exc:
        logger.info("cannot deepcopy the model (%s); rebuilding it from the factory", exc)
        model = ctx.fresh_model()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |a|`` over finite entries (0 when ``a`` is empty). Host sync."""
    if a.numel() == 0:
        return 0.0
    a = torch.nan_to_num(a.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    b = torch.nan_to_num(b.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    scale = a.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)  # host sync


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return relative_change(a, b) > CHANGE_RTOL


# -- perturbing the embedding output -----------------------------------------------------------
class EmbeddingPerturbation:
    """Adds noise at ``where`` (a bool ``(B, L)`` mask) to the token-embedding output.

    Used as a context manager around a forward; ``applied`` says whether the hook saw an
    output of shape ``(B, L, D)`` and changed it. The noise is drawn once (seeded), with the
    RMS of the embedding output times :data:`PERTURB_SCALE`, so repeated forwards see the
    same perturbation.
    """

    def __init__(self, module: nn.Module, where: torch.Tensor, *, seed: int) -> None:
        self.module = module
        self.where = where
        self.seed = seed
        self.applied = False
        self._noise: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            return None
        if tuple(out.shape[:2]) != tuple(self.where.shape):
            return None
        if self._noise is None or self._noise.shape != out.shape:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
            noise = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            rms = out.detach().float().pow(2).mean().sqrt().clamp_min(1e-3)
            self._noise = noise * (rms * PERTURB_SCALE).to(out.dtype)
        self.applied = True
        mask = self.where.to(out.device).unsqueeze(-1)
        return out + self._noise * mask

    def __enter__(self) -> EmbeddingPerturbation:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def perturbed_ids(ctx: CheckContext, batch: Mapping[str, Any], where: torch.Tensor) -> dict:
    """Fallback when there is no embedding: other token ids at ``where`` (never the pad id)."""
    ids = batch["input_ids"]
    vocab = ctx.vocab_size or int(ids.max()) + 2
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed + 2)
    shift = torch.randint(1, max(vocab - 1, 2), ids.shape, generator=gen).to(ids.device)
    new = (ids + shift) % vocab
    if ctx.pad_id is not None:
        new = torch.where(new == ctx.pad_id, (new + 1) % vocab, new)
        new = torch.where(new == ids, (new + 1) % vocab, new)
    out = dict(batch)
    out["input_ids"] = torch.where(where.to(ids.device), new, ids)
    return out


@contextlib.contextmanager
def perturbation(
    ctx: CheckContext, batch: Mapping[str, Any], where: torch.Tensor
) -> Iterator[dict[str, Any]]:
    """Context in which a forward on the yielded batch sees inputs changed at ``where``.

    Prefers noise on the embedding output (continuous, independent of the token ids' meaning);
    falls back to changing the token ids when the model has no usable ``nn.Embedding``.
    """
    emb = ctx.embedding_module()
    if emb is None:
        yield perturbed_ids(ctx, batch, where)
        return
    with EmbeddingPerturbation(emb, where, seed=ctx.seed) as p:
        yield dict(batch)
    if not p.applied:
        raise _NotApplied


class _NotApplied(Exception):
    """The embedding hook never saw a (B, L, D) output: use token ids instead."""


def perturbed_forward(
    ctx: CheckContext,
    batch: Mapping[str, Any],
    where: torch.Tensor,
    run: Callable[[dict], Any],
    *,
    on_retry: Callable[[], None] | None = None,
) -> Any:
    """``run(batch)`` with the inputs perturbed at ``where`` (embedding noise, else ids).

    When the embedding hook could not apply (no ``(B, L, D)`` output, e.g. a model that embeds
    ``input_ids.T``), ``on_retry()`` is called and ``run`` repeated with other token ids.
    """
    try:
        with perturbation(ctx, batch, where) as b:
            result = run(b)
        return result
    except _NotApplied:
        if on_retry is not None:
            on_retry()
        # the same random stream as the first attempt (and as the unperturbed forward it is
        # compared with, run from the same seed): in train mode, other dropout masks alone
        # would change every output
        with seeded(ctx.seed):
            return run(perturbed_ids(ctx, batch, where))


# -- locating the first module where a dependence appears ---------------------------------------
def region_values(t: torch.Tensor, region: torch.Tensor) -> torch.Tensor | None:
    """Entries of ``t`` at the (sample, position) pairs where ``region`` (B, L) is True.

    Recognises layouts ``(B, L, ...)``, ``(B, H, L, ...)``, ``(L, B, ...)`` and ``(B*L, ...)``; None for
    tensors in none of them (e.g. per-position tables ``(L, D)``).
    """
    B, L = region.shape
    shape = tuple(t.shape)
    if len(shape) >= 2 and shape[:2] == (B, L):
        dims = (0, 1)
    elif len(shape) >= 3 and shape[0] == B and shape[2] == L:
        dims = (0, 2)
    elif len(shape) >= 2 and shape[:2] == (L, B):
        dims = (1, 0)
    elif len(shape) >= 2 and shape[0] == B * L:  # tokens flattened: (B*L, ...)
        return t.reshape(B, L, *shape[1:])[region.to(t.device)]
    else:
        return None
    moved = t.movedim(dims, (0, 1))
    return moved[region.to(t.device)]


def _float_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if depth > 1:
        return []
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _float_tensors(o, depth + 1)]
    return []


class _Tracer:
    """Forward hooks that, per module call, keep (baseline pass) or compare (second pass) the
    region of its inputs and first output."""

    def __init__(self, model: nn.Module, region: torch.Tensor) -> None:
        self.model = model
        self.region = region
        self.baseline: list[tuple[str, list[torch.Tensor], torch.Tensor | None]] = []
        self.compare = False
        self.first: str | None = None
        self.found = False
        self._i = 0
        self._handles: list[Any] = []

    def _take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        v = region_values(t, self.region)
        return None if v is None else v.detach().clone()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            ins = [self._take(t) for t in _float_tensors(args) + _float_tensors(kwargs)]
            ins_kept = [t for t in ins if t is not None]
            out = self._take(first_float_tensor(output))
            if not self.compare:
                self.baseline.append((name, ins_kept, out))
                return
            i, self._i = self._i, self._i + 1
            if self.found or i >= len(self.baseline):
                return
            bname, bins, bout = self.baseline[i]
            if bname != name or bout is None or out is None or bout.shape != out.shape:
                return
            if not changed(bout, out):
                return
            same_inputs = len(bins) == len(ins_kept) and all(
                a.shape == b.shape and not changed(a, b)
                for a, b in zip(bins, ins_kept, strict=True)
            )
            if same_inputs:
                self.first, self.found = name, True

        return hook

    def reset(self) -> None:
        """Start comparing from the first call again (a repeated perturbed forward)."""
        self._i, self.first, self.found = 0, None, False

    def __enter__(self) -> _Tracer:
        for name, m in self.model.named_modules():
            self._handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def first_divergent_module(
    ctx: CheckContext,
    batch: Mapping[str, Any],
    where: torch.Tensor,
    region: torch.Tensor,
    *,
    train: bool = False,
    dropout: bool = True,
) -> str | None:
    """The first module (execution order) whose output in ``region`` changes when the
    inputs are perturbed at ``where`` while its own inputs in ``region`` did not.

    Returns the module path; ``""`` when only the root module's own code introduces it;
    None when no module output could be compared.
    """
    with _Tracer(ctx.model, region) as tracer, torch.no_grad():
        with controlled(ctx.model, train=train, seed=ctx.seed, dropout=dropout):
            ctx.forward(batch)
        tracer.compare = True
        with controlled(ctx.model, train=train, seed=ctx.seed, dropout=dropout):
            perturbed_forward(ctx, batch, where, ctx.forward, on_retry=tracer.reset)
    return tracer.first
