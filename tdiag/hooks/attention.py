"""Attention capture: a ``TorchFunctionMode`` that sees every attention computation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdiag.hooks.common import _HOOK_ERRORS, ModuleStackMode, _one_line

__all__ = [
    "ATTN_CHUNK_SCORES",
    "ATTN_SAMPLE_ROWS",
    "ATTN_SAMPLE_SCORES",
    "AttentionCall",
    "AttentionCapture",
    "attention_sample_indices",
]

logger = logging.getLogger("tdiag.hooks")


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


class AttentionCapture(ModuleStackMode):
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
        super().__init__(model)
        self.keep_probs = keep_probs
        self.calls: list[AttentionCall] = []
        self.errors = 0

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
