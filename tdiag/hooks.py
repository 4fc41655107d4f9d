"""Forward/backward hooks and attention capture, with on-device statistic buffers.

Shared by the debugger (``tdiag check``) and the Monitor. Three collectors:

- :class:`ActivationRecorder`: forward hooks on named modules; per call, the statistics
  of the module's output (and optionally of its first input), in execution order.
- :class:`GradientRecorder`: the gradient w.r.t. each module's output and each parameter's
  gradient, in the order backward produced them.
- :class:`AttentionCapture`: a ``TorchFunctionMode`` that sees every
  ``scaled_dot_product_attention`` / attention-like ``softmax`` even in models that do not
  expose their attention probabilities.

Rules: hooks never raise in the hot path (a failure is logged once and counted); every
handle is kept and removed on :meth:`detach` / ``__exit__``; detaching leaves the model as
it was (no hooks, same mode, same ``requires_grad``, same parameters). Statistics stay on
the device until ``to_host()``, which does ONE host sync for all records. When
``enabled`` is False the hooks return after a single attribute check.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from tdiag.stats import STAT_NAMES, tensor_stats

__all__ = [
    "ATTN_CHUNK_SCORES",
    "ATTN_SAMPLE_ROWS",
    "ATTN_SAMPLE_SCORES",
    "ActivationRecorder",
    "AttentionCall",
    "AttentionCapture",
    "GradRecord",
    "GradientRecorder",
    "ModuleRecord",
    "attention_sample_indices",
    "first_float_tensor",
]

logger = logging.getLogger(__name__)

ModuleFilter = Callable[[str, nn.Module], bool]

# Errors a statistic can raise on exotic tensors (sparse, meta, nested...): the hook records
# nothing for that call instead of breaking the user's forward/backward.
_HOOK_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)
#: Length of the error quoted in the one warning a failing hook logs.
_MAX_ERROR_CHARS = 200


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a dispatcher error such as "Could not run
    'aten::aminmax' with arguments from the 'NestedTensorCPU' backend" goes on to list every
    backend over ~90 lines)."""
    first = str(exc).strip().split("\n", 1)[0]
    if len(first) > _MAX_ERROR_CHARS:
        first = first[: _MAX_ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {first}"


def first_float_tensor(obj: Any, _depth: int = 0) -> torch.Tensor | None:
    """The first floating-point tensor inside a module output or input.

    Looks into tensors, tuples/lists, mappings (incl. Hugging Face ``ModelOutput``), objects
    with ``.logits`` / ``.last_hidden_state`` and dataclasses, two levels deep.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if _depth > 2 or obj is None:
        return None
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, list | tuple):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        values = [getattr(obj, a, None) for a in ("logits", "last_hidden_state")]
    for v in values:
        found = first_float_tensor(v, _depth + 1)
        if found is not None:
            return found
    return None


def _default_filter(name: str, module: nn.Module) -> bool:
    return name != ""  # every named submodule, not the root


class _HookOwner:
    """Keeps hook handles; removes all of them on detach."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.enabled = True
        self.errors = 0  # hook calls that failed and recorded nothing

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook_failed(self, where: str, exc: BaseException) -> None:
        if self.errors == 0:
            logger.warning(
                "tdiag hook on %s could not record (%s); recording nothing", where, _one_line(exc)
            )
        self.errors += 1

    def detach(self) -> None:
        """Remove every hook this object registered. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        self.attach()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


@dataclass
class ModuleRecord:
    """One forward call of one module.

    Attributes:
        name: the module's path in ``named_modules()``.
        cls_name: the module's class name.
        order: 0-based index of this call in execution (completion) order.
        out_stats: ``Tensor[4]`` (see ``tdiag.stats.STAT_NAMES``) of the first floating output.
        in_stats: ``Tensor[4]`` of the first floating input, when recorded, else None.
    """

    name: str
    cls_name: str
    order: int
    out_stats: torch.Tensor
    in_stats: torch.Tensor | None = None


class ActivationRecorder(_HookOwner):
    """Forward hooks recording activation statistics per module call, on the device.

    Args:
        model: the model; hooks go on ``model.named_modules()`` passing ``module_filter``.
        module_filter: ``(name, module) -> bool``; default: every submodule except the root.
        inputs: also record the statistics of each module's first floating input.

    Usage::

        with ActivationRecorder(model, inputs=True) as rec:
            model(x)
        rows = rec.to_host()   # one host sync
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        module_filter: ModuleFilter | None = None,
        inputs: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.module_filter = module_filter or _default_filter
        self.inputs = inputs
        self.records: list[ModuleRecord] = []

    def attach(self) -> ActivationRecorder:
        """Register the forward hooks (no-op when already attached)."""
        if self._handles:
            return self
        for name, module in self.model.named_modules():
            if self.module_filter(name, module):
                self._handles.append(
                    module.register_forward_hook(self._make_hook(name, module), with_kwargs=True)
                )
        return self

    def _make_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        cls_name = type(module).__name__

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.enabled:
                return
            try:
                out = first_float_tensor(output)
                if out is None:
                    return
                in_stats = None
                if self.inputs:
                    inp = first_float_tensor(args)
                    if inp is None:
                        inp = first_float_tensor(kwargs)
                    in_stats = tensor_stats(inp) if inp is not None else None
                self.records.append(
                    ModuleRecord(name, cls_name, len(self.records), tensor_stats(out), in_stats)
                )
            except _HOOK_ERRORS as exc:
                self._hook_failed(name, exc)

        return hook

    def clear(self) -> None:
        """Forget the records (keep the hooks)."""
        self.records.clear()

    def to_host(self) -> list[dict[str, Any]]:
        """All records as dicts, with ONE host sync.

        Returns:
            ``[{"name", "cls_name", "order", "out": {stat: float}, "in": {stat: float}|None}]``.
        """
        if not self.records:
            return []
        tensors = [r.out_stats for r in self.records]
        has_in = [r.in_stats is not None for r in self.records]
        tensors += [r.in_stats for r in self.records if r.in_stats is not None]
        values = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()  # host sync
        n = len(self.records)
        ins = iter(values[n:])
        rows = []
        for r, v, hi in zip(self.records, values[:n], has_in, strict=True):
            rows.append(
                {
                    "name": r.name,
                    "cls_name": r.cls_name,
                    "order": r.order,
                    "out": dict(zip(STAT_NAMES, v, strict=True)),
                    "in": dict(zip(STAT_NAMES, next(ins), strict=True)) if hi else None,
                }
            )
        return rows


@dataclass
class GradRecord:
    """One gradient seen during backward.

    Attributes:
        name: module path (``kind == "module"``) or parameter path (``kind == "param"``).
        kind: "module" (gradient w.r.t. the module's output) or "param" (the parameter's gradient).
        order: 0-based index in the order backward produced the gradients.
        stats: ``Tensor[4]`` (``tdiag.stats.STAT_NAMES``) of the gradient, on the device.
    """

    name: str
    kind: str
    order: int
    stats: torch.Tensor


class GradientRecorder(_HookOwner):
    """Records gradient statistics per module output and per parameter, in arrival order.

    Module gradients are taken with a tensor hook on the module's output, registered by a
    forward hook, rather than ``register_full_backward_hook``: the latter wraps outputs in a
    custom autograd function that breaks in-place ops on them (``nn.ReLU(inplace=True)``).
    Parameter gradients come from ``Parameter.register_hook`` (before accumulation into
    ``.grad``, so each backward is seen on its own).

    Records accumulate over backward passes: call :meth:`clear` once per step (it also drops
    the per-forward tensor hooks of graphs already used).

    Args:
        model: the model.
        module_filter: which modules get an output-gradient hook (default: all but the root).
        modules: record module output gradients. params: record parameter gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        module_filter: ModuleFilter | None = None,
        modules: bool = True,
        params: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.module_filter = module_filter or _default_filter
        self.record_modules = modules
        self.record_params = params
        self.records: list[GradRecord] = []
        self._tensor_handles: list[RemovableHandle] = []

    @property
    def module_records(self) -> list[GradRecord]:
        return [r for r in self.records if r.kind == "module"]

    @property
    def param_records(self) -> list[GradRecord]:
        return [r for r in self.records if r.kind == "param"]

    def attach(self) -> GradientRecorder:
        """Register the hooks (no-op when already attached)."""
        if self._handles:
            return self
        if self.record_modules:
            for name, module in self.model.named_modules():
                if self.module_filter(name, module):
                    self._handles.append(module.register_forward_hook(self._make_fwd_hook(name)))
        if self.record_params:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._make_grad_hook(name, "param")))
        return self

    def _make_fwd_hook(self, name: str) -> Callable[..., None]:
        grad_hook = self._make_grad_hook(name, "module")

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if not self.enabled:
                return
            out = first_float_tensor(output)
            if out is not None and out.requires_grad:
                try:
                    self._tensor_handles.append(out.register_hook(grad_hook))
                except _HOOK_ERRORS as exc:
                    self._hook_failed(name, exc)

        return hook

    def _make_grad_hook(self, name: str, kind: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.enabled:
                return
            try:
                self.records.append(GradRecord(name, kind, len(self.records), tensor_stats(grad)))
            except _HOOK_ERRORS as exc:
                self._hook_failed(name, exc)
            # returning None leaves the gradient unchanged

        return hook

    def clear(self) -> None:
        """Forget the records and the per-forward tensor hooks (keep the module/param hooks)."""
        self.records.clear()
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def detach(self) -> None:
        """Remove every hook (the records stay readable)."""
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        super().detach()

    def to_host(self) -> list[dict[str, Any]]:
        """All records as ``{"name", "kind", "order", "stats": {stat: float}}``; ONE host sync."""
        if not self.records:
            return []
        dev = self.records[0].stats.device
        values = torch.stack([r.stats.to(dev) for r in self.records]).tolist()  # host sync
        return [
            {
                "name": r.name,
                "kind": r.kind,
                "order": r.order,
                "stats": dict(zip(STAT_NAMES, v, strict=True)),
            }
            for r, v in zip(self.records, values, strict=True)
        ]


@dataclass
class AttentionCall:
    """One attention computation seen by :class:`AttentionCapture`.

    Attributes:
        index: 0-based order of the call.
        module_name: innermost named module running at the time (when a model was given).
        entropy: 0-d tensor, mean of the attention entropy (nats) over the query rows (all of
            them, or the evenly spread sample described by ``sample``).
        max_logit: 0-d tensor, max pre-softmax score (after scaling, before masking) over the
            same rows and every key, or None. From a sample it is a lower bound of the true max.
        probs: the attention probabilities ``(..., L, S)`` (detached) when ``keep_probs``.
        kind: "sdpa", "softmax" or "mha" (``F.multi_head_attention_forward``).
        shape: shape of the probabilities ``(..., L, S)`` (of the whole call, even when sampled).
        sample: ``(query rows, batch*head slices)`` used when the statistics come from a sample
            (see ``ATTN_SAMPLE_ROWS`` / ``ATTN_SAMPLE_SCORES``); None when exact.
    """

    index: int
    module_name: str | None
    entropy: torch.Tensor
    max_logit: torch.Tensor | None
    probs: torch.Tensor | None
    kind: str = "softmax"
    shape: tuple[int, ...] = ()
    sample: tuple[int, int] | None = None


#: Query rows per attention call from which ``AttentionCapture`` estimates the entropy and
#: max logit (unless ``keep_probs``): at most this many, spread evenly over the sequence
#: (:func:`attention_sample_indices`). Sequences this short or shorter are measured exactly.
ATTN_SAMPLE_ROWS = 256

#: At most this many attention scores (sampled rows x keys x batch*head slices) are recomputed
#: per SDPA call; beyond it only evenly spread batch*head slices are used (at least one).
ATTN_SAMPLE_SCORES = 1 << 26

#: The recomputed scores are processed in chunks of batch*head slices holding at most this many
#: scores (at least one slice per chunk), so peak extra memory stays O(chunk), not O(B*H*L*S).
ATTN_CHUNK_SCORES = 1 << 24


def attention_sample_indices(
    n: int, k: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``min(n, k)`` distinct indices in ``[0, n)`` spread evenly, first and last included.

    Deterministic: ``floor(i * (n - 1) / (k - 1))`` for ``i < k``; ``arange(n)`` when ``n <= k``.
    """
    if n <= k:
        return torch.arange(n, device=device)
    if k <= 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.arange(k, device=device) * (n - 1) // (k - 1)


def _entropy_sum_count(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and number of the rows' ``-sum p log p`` (nats); 0*log 0 = 0; NaN rows left out."""
    p = probs.detach().float()
    ent = -torch.special.xlogy(p, p).sum(-1)  # (..., L)
    nan = ent.isnan()
    return ent.masked_fill(nan, 0.0).sum(), (~nan).sum()


def _row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum p log p`` (nats); 0*log 0 = 0; fully masked (NaN) rows ignored."""
    total, count = _entropy_sum_count(probs)
    return total / count


def _batch_index(
    t: torch.Tensor, idx: list[torch.Tensor], batch_shape: tuple[int, ...], gqa_dim: int | None
) -> list[torch.Tensor]:
    """Advanced indices selecting, in ``t``'s leading (batch) dims, the flattened slices whose
    per-dim indices are ``idx`` (broadcast dims of size 1 take index 0; ``gqa_dim``: the head
    dim of a key/value with fewer heads, mapped by ``h // group``)."""
    nb = t.dim() - 2
    out = []
    for j in range(nb):
        i = j + len(batch_shape) - nb
        size = t.shape[j]
        if size == batch_shape[i]:
            out.append(idx[i])
        elif size == 1:
            out.append(torch.zeros_like(idx[i]))
        elif i == gqa_dim:
            out.append(idx[i] // (batch_shape[i] // size))
        else:
            raise ValueError(f"cannot broadcast shape {tuple(t.shape)} to batch {batch_shape}")
    return out


def _causal_variant(mask: Any) -> str | None:
    """ "upper_left" / "lower_right" for a ``torch.nn.attention.bias.CausalBias`` mask."""
    variant = getattr(mask, "variant", None)
    if variant is None or not hasattr(mask, "seq_len_kv"):
        return None
    name = str(getattr(variant, "name", variant)).upper()
    return "lower_right" if "LOWER" in name else "upper_left"


_SOFTMAX_FUNCS = (F.softmax, torch.softmax, torch.Tensor.softmax)


class AttentionCapture(TorchFunctionMode):
    """Sees every attention computation inside the ``with`` block, whatever the model.

    Intercepts ``F.scaled_dot_product_attention`` (recomputes the probabilities from q, k, the
    mask, ``is_causal`` and ``scale``), ``softmax`` over the last dim of a tensor with >= 3
    dims (eager attention; it may also catch other such softmaxes), and
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, asked for per-head weights).
    Results returned to the model are the original function's.

    Cost: unless ``keep_probs``, the entropy and max logit come from at most
    ``ATTN_SAMPLE_ROWS`` query rows per call, spread evenly over the sequence
    (:func:`attention_sample_indices`; every row, i.e. exact, when ``L <= ATTN_SAMPLE_ROWS``),
    each against all keys. For SDPA only those rows' scores are recomputed (fp32, SDPA's causal
    / ``attn_mask`` / ``scale`` / GQA semantics), over at most ``ATTN_SAMPLE_SCORES`` scores
    (beyond it, evenly spread batch*head slices) and in chunks of ``ATTN_CHUNK_SCORES``: extra
    memory is O(rows * S) per slice, never the ``B*H*L*S`` matrix. The entropy is then the mean
    over the sampled rows and the max logit a lower bound of the true max
    (``AttentionCall.sample`` says what was used).

    Args:
        keep_probs: keep the probability tensors, all of them, computed exactly (memory:
            B*H*L*S floats per call; for small inputs, e.g. the debugger).
        model: when given, the name of the innermost running module is recorded per call.

    Usage::

        with AttentionCapture(keep_probs=True, model=model) as cap:
            model(x)
        for call in cap.calls: ...
    """

    def __init__(self, keep_probs: bool = False, *, model: nn.Module | None = None) -> None:
        super().__init__()
        self.keep_probs = keep_probs
        self.model = model
        self.calls: list[AttentionCall] = []
        self.errors = 0
        self._stack: list[str] = []
        self._handles: list[RemovableHandle] = []

    # -- module-name tracking ---------------------------------------------------------------
    def __enter__(self) -> AttentionCapture:
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._push(name)))
                self._handles.append(module.register_forward_hook(self._pop(name)))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _push(self, name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            self._stack.append(name)

        return pre

    def _pop(self, name: str) -> Callable[..., None]:
        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return post

    # -- interception ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = func(*args, **kwargs)
            self._guard(self._record_sdpa, args, kwargs)
            return out
        if func in _SOFTMAX_FUNCS:
            out = func(*args, **kwargs)
            self._guard(self._record_softmax, args, kwargs, out)
            return out
        if func is F.multi_head_attention_forward:
            return self._mha(func, args, kwargs)
        return func(*args, **kwargs)

    def clear(self) -> None:
        self.calls.clear()

    def _guard(self, fn: Callable[..., None], *a: Any) -> None:
        try:
            fn(*a)
        except _HOOK_ERRORS as exc:
            if self.errors == 0:
                logger.warning(
                    "tdiag attention capture could not record a call (%s)", _one_line(exc)
                )
            self.errors += 1

    def _append(
        self,
        kind: str,
        entropy: torch.Tensor,
        max_logit: torch.Tensor | None,
        probs: torch.Tensor | None,
        shape: tuple[int, ...],
        sample: tuple[int, int] | None = None,
    ) -> None:
        self.calls.append(
            AttentionCall(
                index=len(self.calls),
                module_name=self._stack[-1] if self._stack else None,
                entropy=entropy,
                max_logit=max_logit,
                probs=probs,
                kind=kind,
                shape=shape,
                sample=sample,
            )
        )

    def _add(self, kind: str, probs: torch.Tensor, max_logit: torch.Tensor | None) -> None:
        """Record probabilities the model already computed (softmax, MHA weights)."""
        shape = tuple(probs.shape)
        if self.keep_probs or probs.dim() < 2 or probs.shape[-2] <= ATTN_SAMPLE_ROWS:
            kept = probs.detach() if self.keep_probs else None
            self._append(kind, _row_entropy(probs), max_logit, kept, shape)
            return
        rows = attention_sample_indices(probs.shape[-2], ATTN_SAMPLE_ROWS, probs.device)
        n_slices = probs[..., 0, 0].numel()
        entropy = _row_entropy(probs.detach().index_select(-2, rows))
        self._append(kind, entropy, max_logit, None, shape, (rows.numel(), n_slices))

    def _record_softmax(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or dim is None:
            return
        if dim not in (-1, x.dim() - 1):
            return
        with torch.no_grad():
            # max in the input dtype (exact), then fp32: no fp32 copy of the scores
            self._add("softmax", out, x.detach().amax().float())

    def _record_sdpa(self, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        q, k = bound["query"], bound["key"]
        mask = bound.get("attn_mask")
        scale = bound.get("scale")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        L, S = q.shape[-2], k.shape[-2]
        # causal: SDPA's is_causal is top-left aligned (query i sees keys j <= i); a CausalBias
        # mask says which alignment it uses
        causal_offset: int | None = 0 if bound.get("is_causal") else None
        variant = _causal_variant(mask) if mask is not None else None
        if variant is not None:
            causal_offset = S - L if variant == "lower_right" else 0
            mask = None
        if mask is not None and mask.dim() < 2:
            mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
        # batch dims: broadcast of q, k (GQA: k/v have fewer heads, in dim -3) and mask
        gqa_dim = None
        k_batch = list(k.shape[:-2])
        if (
            q.dim() >= 3
            and k.dim() == q.dim()
            and k.shape[-3] not in (1, q.shape[-3])
            and q.shape[-3] % k.shape[-3] == 0
        ):
            k_batch[-1] = q.shape[-3]
            gqa_dim = len(k_batch) - 1
        shapes = [tuple(q.shape[:-2]), tuple(k_batch)]
        if mask is not None:
            shapes.append(tuple(mask.shape[:-2]))
        batch_shape = tuple(torch.broadcast_shapes(*shapes))
        if gqa_dim is not None:  # the dim index counted in the broadcast batch shape
            gqa_dim += len(batch_shape) - len(k_batch)
        n = math.prod(batch_shape)
        if n == 0 or L == 0 or S == 0:
            return
        shape = (*batch_shape, L, S)
        dev = q.device

        if self.keep_probs:  # the caller wants every probability: exact, one chunk
            rows = torch.arange(L, device=dev)
            slices = torch.arange(n, device=dev)
            chunk = max(n, 1)
        else:
            rows = attention_sample_indices(L, ATTN_SAMPLE_ROWS, dev)
            r = rows.numel()
            n_slices = (
                n if n * r * S <= ATTN_SAMPLE_SCORES else max(1, ATTN_SAMPLE_SCORES // (r * S))
            )
            slices = attention_sample_indices(n, n_slices, dev)
            chunk = max(1, ATTN_CHUNK_SCORES // (r * S))
        r, n_sel = rows.numel(), slices.numel()
        keep_causal = None
        if causal_offset is not None:  # (r, S): key j visible to query row i when j <= i + offset
            keep_causal = torch.arange(S, device=dev) <= (rows + causal_offset)[:, None]

        with torch.no_grad():
            total = torch.zeros((), device=dev)
            count = torch.zeros((), dtype=torch.long, device=dev)
            max_logit = torch.full((), float("-inf"), device=dev)
            kept: list[torch.Tensor] = []
            for c0 in range(0, n_sel, chunk):
                ids = slices[c0 : c0 + chunk]
                idx = list(torch.unravel_index(ids, batch_shape)) if batch_shape else []
                col = [i[:, None] for i in idx]  # (c, 1): broadcast against the rows (1, r)
                q_c = q.detach()[(*_batch_index(q, col, batch_shape, None), rows[None, :])]
                k_c = k.detach()[tuple(_batch_index(k, idx, batch_shape, gqa_dim))]
                if k_c.dim() == 2:
                    k_c = k_c[None]
                scores = (q_c.float() @ k_c.float().transpose(-2, -1)) * scale  # (c|1, r, S)
                max_logit = torch.maximum(max_logit, scores.amax())
                if keep_causal is not None:
                    scores = scores.masked_fill(~keep_causal, float("-inf"))
                if mask is not None:
                    m_rows = (
                        rows[None, :] if mask.shape[-2] != 1 else torch.zeros_like(rows)[None, :]
                    )
                    m_c = mask[(*_batch_index(mask, col, batch_shape, None), m_rows)]
                    if m_c.dtype == torch.bool:
                        scores = scores.masked_fill(~m_c, float("-inf"))
                    else:
                        scores = scores + m_c.float()
                probs = torch.softmax(scores, dim=-1)
                del scores
                t, cnt = _entropy_sum_count(probs)
                total, count = total + t, count + cnt
                if self.keep_probs:
                    kept.append(probs)
            entropy = total / count
        probs_out = torch.cat(kept).reshape(shape) if self.keep_probs else None
        sample = None if (r == L and n_sel == n) else (r, n_sel)
        self._append("sdpa", entropy, max_logit, probs_out, shape, sample)

    def _mha(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # Ask for per-head weights, return what the caller asked for.
        need = kwargs.get("need_weights", True)
        average = kwargs.get("average_attn_weights", True)
        out, weights = func(
            *args, **{**kwargs, "need_weights": True, "average_attn_weights": False}
        )
        if weights is not None:
            self._guard(lambda w: self._add("mha", w, None), weights)
        if not need:
            return out, None
        if average and weights is not None:
            weights = weights.mean(dim=-3)
        return out, weights
