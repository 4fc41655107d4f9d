"""Structure checks: does each output depend only on what it may depend on?

Each check perturbs part of the input (noise on the token-embedding output, see
:mod:`tdiag.debug.probes`) and looks at outputs that must not move: past positions for a
causal model (``causal.leak``), the other samples of the batch (``batch.mixing``), the real
tokens next to padding (``padding.leak``). ``position.missing`` permutes the sequence of a
bidirectional model; ``kvcache.mismatch`` compares the file's ``decode_with_cache`` with a
full forward. When a dependence is found, the module that introduces it is named: the first
one (execution order) whose output changed where its inputs had not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from tdiag.debug.context import forward_params, logits_from_output
from tdiag.debug.probes import CHANGE_RTOL as LEAK_RTOL
from tdiag.debug.probes import (
    clean_batch,
    controlled,
    first_divergent_module,
    perturbed_forward,
    relative_change,
)
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: Relative change of the logits under a permutation of the sequence below which a model is
#: permutation-equivariant (it cannot tell token order). Any positional signal moves logits by
#: far more than float32 rounding (~1e-6).
EQUIVARIANCE_RTOL = 1e-4

#: Relative difference between cached and full-forward logits above which the KV cache is
#: wrong. float32 recomputation in another order differs by ~1e-6 relative; a cache bug (wrong
#: positions, stale keys) by O(1). 1e-3 also tolerates TF32 matmuls on GPUs.
KV_RTOL = 1e-3


def _logits(
    ctx: CheckContext, batch: Mapping[str, Any], *, train: bool = False, dropout: bool = True
) -> torch.Tensor:
    with torch.no_grad(), controlled(ctx.model, train=train, seed=ctx.seed, dropout=dropout):
        return ctx.forward(batch).detach()


def _perturbed_logits(
    ctx: CheckContext,
    batch: Mapping[str, Any],
    where: torch.Tensor,
    *,
    train: bool = False,
    dropout: bool = True,
) -> torch.Tensor:
    with torch.no_grad(), controlled(ctx.model, train=train, seed=ctx.seed, dropout=dropout):
        return perturbed_forward(ctx, batch, where, ctx.forward).detach()


def _where_text(where: str | None) -> str:
    if where is None:
        return "no single module could be named"
    return f"it first appears in {where!r}" if where else "it appears in the model's own forward()"


# -- causal.leak ---------------------------------------------------------------------------------
@register_check("causal.leak", family="structure", title="Causal model sees future tokens")
def check_causal_leak(ctx: CheckContext) -> list[Finding]:
    """Perturb positions >= p and look for a change at positions < p, for a few boundaries p."""
    if not ctx.causal:
        raise SkipCheck("the model is bidirectional (CAUSAL = False / --no-causal)")
    batch = clean_batch(ctx)
    B, L = batch["input_ids"].shape
    if L < 2:
        raise SkipCheck("sequences of length 1 have no future")
    base = _logits(ctx, batch)
    pos = torch.arange(L, device=base.device)
    for p in dict.fromkeys((L // 2, L - 1, 1)):  # middle first: the broadest view
        future = (pos >= p).expand(B, L)
        out = _perturbed_logits(ctx, batch, future)
        per_pos = [relative_change(base[:, t], out[:, t]) for t in range(p)]  # host syncs
        leaking = [t for t, c in enumerate(per_pos) if c > LEAK_RTOL]
        if not leaking:
            continue
        where = first_divergent_module(ctx, batch, future, ~future)
        return [
            Finding(
                id="causal.leak",
                severity=Severity.ERROR,
                title="Causal model sees future tokens",
                message=(
                    f"Changing the inputs at positions >= {p} changes the outputs at positions "
                    f"{_positions(leaking)} (max relative change {max(per_pos):.3g}); "
                    f"{_where_text(where)}. A language model trained like this learns to copy the "
                    "next token and fails at generation."
                ),
                where=where or None,
                evidence={
                    "boundary": p,
                    "leaking_positions": leaking,
                    "max_relative_change": max(per_pos),
                    "threshold": LEAK_RTOL,
                },
                recommendation=(
                    "Apply a causal mask in every self-attention: "
                    "F.scaled_dot_product_attention(q, k, v, is_causal=True), or "
                    "scores.masked_fill(~torch.ones(L, L).tril().bool(), -inf) with tril (not "
                    "triu, not diagonal=1) before the softmax. Check also for ops that mix "
                    "positions (BatchNorm over tokens, mean pooling, a wrong reshape). If the "
                    "model is bidirectional on purpose, set CAUSAL = False in the file."
                ),
            )
        ]
    return []


def _positions(ps: list[int]) -> str:
    return ", ".join(map(str, ps[:8])) + (" ..." if len(ps) > 8 else "")


# -- batch.mixing --------------------------------------------------------------------------------
#: At most this many samples are compared: enough for BatchNorm statistics and for a mask
#: or reshape running along the batch, and the number of forwards grows with log2 of it.
MIXING_MAX_BATCH = 8


def _sample_splits(n: int) -> list[tuple[list[int], list[int]]]:
    """(perturbed, watched) sample sets covering every ordered pair of samples: for each bit of
    the sample index, the samples with the bit set against those without, both ways. Two
    samples differ in some bit, so each dependence of sample i on sample j shows in one split;
    2·ceil(log2 n) forwards instead of n (watching only sample 0 misses a causal mask that
    runs along the batch: sample 0 then sees no other sample, every later one sees it)."""
    splits = []
    for bit in range((n - 1).bit_length()):
        ones = [b for b in range(n) if b >> bit & 1]
        zeros = [b for b in range(n) if not b >> bit & 1]
        splits += [(ones, zeros), (zeros, ones)]
    return splits


def _samples(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


@register_check("batch.mixing", family="structure", title="Samples of a batch influence each other")
def check_batch_mixing(ctx: CheckContext) -> list[Finding]:
    """Perturb some samples and watch the others, for splits covering every pair of samples,
    in train mode (where BatchNorm mixes) with dropout layers off (see :func:`_sample_splits`)."""
    batch = clean_batch(ctx, max_batch=MIXING_MAX_BATCH)
    B, L = batch["input_ids"].shape
    base = _logits(ctx, batch, train=True, dropout=False)
    for perturbed, watched in _sample_splits(B):
        where = torch.zeros(B, L, dtype=torch.bool)
        where[perturbed] = True
        out = _perturbed_logits(ctx, batch, where, train=True, dropout=False)
        per_sample = {i: relative_change(base[i], out[i]) for i in watched}  # host syncs
        moved = [i for i, c in per_sample.items() if c > LEAK_RTOL]
        if moved:
            return [_mixing_finding(ctx, batch, perturbed, moved, max(per_sample.values()))]
    return []


def _mixing_finding(
    ctx: CheckContext,
    batch: dict[str, torch.Tensor],
    perturbed: list[int],
    moved: list[int],
    change: float,
) -> Finding:
    B, L = batch["input_ids"].shape
    where = torch.zeros(B, L, dtype=torch.bool)
    where[perturbed] = True
    region = torch.zeros(B, L, dtype=torch.bool)
    region[moved] = True
    name = first_divergent_module(ctx, batch, where, region, train=True, dropout=False)
    seq_first = _sequence_first(ctx, name)
    return Finding(
        id="batch.mixing",
        severity=Severity.ERROR,
        title="Samples of a batch influence each other",
        message=(
            f"Changing sample(s) {_samples(perturbed)} of a batch of {B} changes the output of "
            f"sample(s) {_samples(moved)} (max relative change {change:.3g}, training mode, "
            f"dropout off); {_where_text(name)}."
            + (
                f" {name!r} is sequence-first (batch_first=False) but is given batch-first "
                "tensors (B, L, D): it attends across the batch instead of along each sequence."
                if seq_first
                else ""
            )
        ),
        where=name or None,
        evidence={
            "relative_change": change,
            "threshold": LEAK_RTOL,
            "batch_size": B,
            "perturbed_samples": perturbed,
            "changed_samples": moved,
        },
        recommendation=(
            "Each sample must be computed on its own: use LayerNorm/RMSNorm, not BatchNorm, "
            "over token features; reshape with .view(B, L, H, D).transpose(1, 2) rather than "
            "a view that crosses the batch dimension; keep the batch dimension first (or pass "
            "batch_first=True to nn.MultiheadAttention / nn.TransformerEncoderLayer), or "
            "transpose to (L, B, D) before a sequence-first module and back after it. tdiag "
            "feeds token ids (B, L), batch first."
        ),
    )


def _sequence_first(ctx: CheckContext, name: str | None) -> bool:
    """True when module ``name`` (or the layer that owns it) has ``batch_first=False``."""
    if not name:
        return False
    modules = dict(ctx.model.named_modules())
    parent = name.rpartition(".")[0]
    for n in (name, parent):
        if n in modules and getattr(modules[n], "batch_first", None) is False:
            return True
        attn = getattr(modules.get(n), "self_attn", None)
        if getattr(attn, "batch_first", None) is False:
            return True
    return False


# -- padding.leak --------------------------------------------------------------------------------
def _padded(ctx: CheckContext, *, left: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A clean batch whose sample 0 has its first (left) or last quarter as padding."""
    batch = clean_batch(ctx)
    ids = batch["input_ids"].clone()
    B, L = ids.shape
    n_pad = max(1, L // 4)
    pads = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    if left:
        pads[0, :n_pad] = True
    else:
        pads[0, L - n_pad :] = True
    if ctx.pad_id is not None:
        ids = ids.masked_fill(pads, ctx.pad_id)
    batch["input_ids"] = ids
    if ctx.attention_mask is not None:
        batch["attention_mask"] = (~pads).to(ctx.attention_mask.dtype)
    return batch, pads


@register_check("padding.leak", family="structure", title="Padding changes real outputs")
def check_padding_leak(ctx: CheckContext) -> list[Finding]:
    """Perturb the pad positions of a padded sample and look at its real positions."""
    if ctx.attention_mask is None and ctx.pad_id is None:
        raise SkipCheck("the batch has no attention_mask and the model no known pad id")
    # Left padding for a causal model: with right padding, causality alone hides the pads.
    for left in (True, False) if ctx.causal else (False,):
        batch, pads = _padded(ctx, left=left)
        real = ~pads
        real[1:] = False
        base = _logits(ctx, batch)
        if torch.isfinite(base[0][real[0]]).all():  # host sync
            break
    else:
        raise SkipCheck("the outputs of a padded batch are not finite (see numerics checks)")
    out = _perturbed_logits(ctx, batch, pads)
    change = relative_change(base[0][real[0]], out[0][real[0]])  # host sync
    if change <= LEAK_RTOL:
        return []
    where = first_divergent_module(ctx, batch, pads, real)
    has_mask = "attention_mask" in batch
    how = "attention_mask" if has_mask else f"pad id {ctx.pad_id} (no attention_mask given)"
    params = forward_params(ctx.model) if has_mask and ctx.batch_style == "dict" else None
    unused = params is not None and not any(
        p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in params
    )
    if unused:  # the mask never reaches the model
        how += f", which {type(ctx.model).__name__}.forward() does not even take"
    return [
        Finding(
            id="padding.leak",
            severity=_padding_severity(has_mask, ctx.causal),
            title="Padding changes the outputs at real tokens",
            message=(
                f"Changing the {int(pads.sum())} pad positions ({'left' if left else 'right'} "
                f"padding marked by the {how}) changes the outputs at the real tokens of the same "
                f"sample (relative change {change:.3g}); {_where_text(where)}. Results then depend "
                "on how much padding the batch happens to have."
            ),
            where=where or None,
            evidence={
                "relative_change": change,
                "threshold": LEAK_RTOL,
                "padding": "left" if left else "right",
                "pad_positions": int(pads.sum()),
            },
            recommendation=(
                "Right padding is harmless to a causal model; if you left-pad (batched "
                "generation), pass a padding mask built from the pad id to the attention. "
                if not has_mask and ctx.causal
                else ""
            )
            + "Pass the padding mask to every attention layer (key_padding_mask / attn_mask: "
            "set the scores of pad keys to -inf before the softmax), and ignore pad positions "
            "in the loss (labels = -100 there). Avoid BatchNorm or pooling that averages over "
            "pad positions.",
        )
    ]


def _padding_severity(has_mask: bool, causal: bool) -> Severity:
    """An ignored attention_mask is an error. Without one in the batch the model may expect
    no padding at all: a warning for a bidirectional model (pads anywhere reach every token),
    info for a causal one (only left padding, as in batched generation, can reach real
    tokens; right padding, the usual one in training, cannot)."""
    if has_mask:
        return Severity.ERROR
    return Severity.INFO if causal else Severity.WARNING


# -- position.missing ----------------------------------------------------------------------------
@register_check("position.missing", family="structure", title="Model ignores token order")
def check_position_missing(ctx: CheckContext) -> list[Finding]:
    """A bidirectional model whose output permutes with its input has no positional information."""
    if ctx.causal:
        raise SkipCheck("a causal model gets token order from its mask")
    batch = clean_batch(ctx)
    _B, L = batch["input_ids"].shape
    if L < 3:
        raise SkipCheck("sequences too short to permute")
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    perm = torch.randperm(L, generator=gen)
    if torch.equal(perm, torch.arange(L)):
        perm = perm.roll(1)
    perm = perm.to(batch["input_ids"].device)
    permuted = {k: v[:, perm] for k, v in batch.items()}
    base = _logits(ctx, batch)
    out = _logits(ctx, permuted)
    change = relative_change(base[:, perm], out)  # host sync
    if change > EQUIVARIANCE_RTOL:
        return []
    return [
        Finding(
            id="position.missing",
            severity=Severity.ERROR,
            title="The model cannot tell token order",
            message=(
                "Shuffling the tokens of the input shuffles the outputs the same way (relative "
                f"difference {change:.2g}): the model has no positional information and sees a "
                "bag of tokens."
            ),
            # where positions are usually added: the token embedding
            where=ctx.module_name(emb) if (emb := ctx.embedding_module()) is not None else None,
            evidence={"relative_change": change, "threshold": EQUIVARIANCE_RTOL},
            recommendation=(
                "Add positional information: sinusoidal or learned position embeddings added to "
                "the token embeddings (x = tok_emb + pos_emb[:L]), or rotary embeddings (RoPE) "
                "applied to q and k in every attention layer."
            ),
        )
    ]


# -- kvcache.mismatch ----------------------------------------------------------------------------
_USER_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)


@register_check("kvcache.mismatch", family="structure", title="KV-cache decoding differs")
def check_kvcache(ctx: CheckContext) -> list[Finding]:
    """The file's ``decode_with_cache(model, input_ids)`` must give the logits of a full forward."""
    if ctx.decode_with_cache is None:
        raise SkipCheck("the file defines no decode_with_cache(model, input_ids)")
    batch = clean_batch(ctx, max_batch=2)
    ids = batch["input_ids"]
    full = _logits(ctx, batch)
    rec = (
        "Compare your cached decoding with a full forward position by position: give new "
        "tokens the positions past + t (position ids / RoPE offset), append the new keys and "
        "values to the cache before attending, and do not apply the causal mask between the "
        "one new query and the cached keys (or shift it by the cache length)."
    )
    try:
        with torch.no_grad(), controlled(ctx.model, train=False, seed=ctx.seed):
            cached = logits_from_output(ctx.decode_with_cache(ctx.model, ids)).detach()
    except _USER_ERRORS as exc:
        return [
            Finding(
                id="kvcache.mismatch",
                severity=Severity.ERROR,
                title="decode_with_cache fails",
                message=f"decode_with_cache(model, input_ids) raised {type(exc).__name__}: {exc}",
                evidence={"exception": type(exc).__name__},
                recommendation=rec,
            )
        ]
    if cached.dim() == 2:  # only the last position
        cached, full = cached[:, None], full[:, -1:]
    elif cached.dim() == 3 and cached.shape[1] <= full.shape[1]:
        full = full[:, full.shape[1] - cached.shape[1] :]
    if cached.shape != full.shape:
        return [
            Finding(
                id="kvcache.mismatch",
                severity=Severity.ERROR,
                title="decode_with_cache returns logits of the wrong shape",
                message=(
                    f"decode_with_cache returned {tuple(cached.shape)}, expected "
                    f"{tuple(full.shape)} (B, L, V) like the full forward."
                ),
                evidence={"shape": list(cached.shape), "expected": list(full.shape)},
                recommendation=rec,
            )
        ]
    offset = ids.shape[1] - full.shape[1]
    per_pos = [relative_change(full[:, t], cached[:, t]) for t in range(full.shape[1])]
    bad = [t + offset for t, c in enumerate(per_pos) if c > KV_RTOL]
    if not bad:
        return []
    return [
        Finding(
            id="kvcache.mismatch",
            severity=Severity.ERROR,
            title="KV-cache decoding differs from a full forward",
            message=(
                f"decode_with_cache gives different logits from a full forward from position "
                f"{bad[0]} on ({len(bad)} of {len(per_pos)} positions; max relative difference "
                f"{max(per_pos):.3g})."
            ),
            evidence={
                "first_bad_position": bad[0],
                "bad_positions": bad,
                "max_relative_difference": max(per_pos),
                "threshold": KV_RTOL,
            },
            recommendation=rec,
        )
    ]
