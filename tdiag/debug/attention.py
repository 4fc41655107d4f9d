"""Attention checks: attention probabilities that are nearly one-hot at init.

The probabilities are captured with :class:`tdiag.hooks.AttentionCapture`, which sees
``F.scaled_dot_product_attention``, ``softmax`` and ``nn.MultiheadAttention`` inside any
model, so the model need not return its attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tdiag.debug.probes import clean_batch, controlled
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity
from tdiag.hooks import AttentionCapture

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: A query row is "peaked" when one key takes more than this share of its attention.
PEAK_PROB = 0.9

#: Only rows that may attend to at least this many keys count (the first rows of a causal
#: model attend to 1-3 keys and are peaked by construction).
MIN_KEYS = 4

#: A layer has collapsed when at least this fraction of its rows is peaked. A judgement: at
#: init with 1/sqrt(d_k) scaling and std ~0.02 weights the scores are ~0 and attention is close
#: to uniform (no peaked row); without scaling and with large weights almost every row is.
COLLAPSED_ROW_FRAC = 0.5


def _row_stats(probs: torch.Tensor, causal_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row: (max probability, normalised entropy) for rows with >= MIN_KEYS keys.

    Args:
        probs: ``(..., L, S)`` attention probabilities.
        causal_rows: row i may attend to ``S - L + i + 1`` keys (else all S).
    """
    p = probs.detach().float()
    L, S = p.shape[-2], p.shape[-1]
    if causal_rows:
        n_keys = torch.arange(S - L + 1, S + 1, device=p.device).clamp(min=1)  # (L,)
    else:
        n_keys = torch.full((L,), S, device=p.device)
    keep = n_keys >= MIN_KEYS
    p = p[..., keep, :]
    n = n_keys[keep].float()
    maxp = p.amax(-1)  # (..., L')
    ent = -torch.special.xlogy(p, p).sum(-1) / n.log()  # (..., L') in [0, 1]
    return maxp.flatten(), ent.flatten()


@register_check(
    "attn.entropy-collapse", family="attention", title="Attention nearly one-hot at init"
)
def check_entropy_collapse(ctx: CheckContext) -> list[Finding]:
    """Capture every attention of one forward and look for layers whose rows are one-hot."""
    batch = clean_batch(ctx)
    L = batch["input_ids"].shape[1]
    cap = AttentionCapture(keep_probs=True, model=ctx.model)
    with torch.no_grad(), controlled(ctx.model, train=False, seed=ctx.seed), cap:
        ctx.forward(batch)
    calls = [c for c in cap.calls if c.probs is not None and tuple(c.probs.shape[-2:]) == (L, L)]
    if not calls:
        raise SkipCheck("no attention (softmax over a (L, L) score matrix) seen in the forward")
    if L < MIN_KEYS + 1:
        raise SkipCheck(f"sequences shorter than {MIN_KEYS + 1} tokens")
    rows: list[dict[str, Any]] = []
    for c in calls:
        probs = c.probs
        assert probs is not None
        causal_rows = bool(ctx.causal and probs.triu(diagonal=1).abs().sum() == 0)  # host sync
        maxp, ent = _row_stats(probs, causal_rows)
        rows.append(
            {
                "call": c.index,
                "module": c.module_name,
                "peaked_frac": (maxp > PEAK_PROB).float().mean(),
                "norm_entropy": ent.mean(),
                "max_logit": c.max_logit,
            }
        )
    keys = ("peaked_frac", "norm_entropy")
    flat = [r[k] for r in rows for k in keys]
    values = torch.stack([v.float() for v in flat]).tolist()  # host sync
    logits = [r["max_logit"] for r in rows]
    logit_vals = (
        torch.stack([v.float() for v in logits]).tolist()  # host sync
        if all(v is not None for v in logits)
        else [None] * len(rows)
    )
    for i, r in enumerate(rows):
        r["peaked_frac"], r["norm_entropy"] = values[2 * i], values[2 * i + 1]
        r["max_logit"] = logit_vals[i]
    bad = [r for r in rows if r["peaked_frac"] >= COLLAPSED_ROW_FRAC]
    if not bad:
        return []
    first = bad[0]
    severity = Severity.ERROR if 2 * len(bad) >= len(rows) else Severity.WARNING
    max_logit = first["max_logit"]
    logit_text = f"; max attention score {max_logit:.3g}" if max_logit is not None else ""
    return [
        Finding(
            id="attn.entropy-collapse",
            severity=severity,
            title="Attention nearly one-hot at init",
            message=(
                f"{len(bad)} of {len(rows)} attention computations are nearly one-hot on a "
                f"random batch: in the first ({first['module'] or 'call ' + str(first['call'])}) "
                f"{first['peaked_frac']:.0%} of the rows put > {PEAK_PROB:.0%} of their weight on one "
                f"key (normalised entropy {first['norm_entropy']:.2f}, 1 = uniform{logit_text}). "
                "The softmax is saturated: its gradient is ~0 and attention cannot learn."
            ),
            where=first["module"],
            evidence={
                "layers": [
                    {k: r[k] for k in ("module", "peaked_frac", "norm_entropy", "max_logit")}
                    for r in rows
                ],
                "peak_prob": PEAK_PROB,
                "threshold": COLLAPSED_ROW_FRAC,
                "uniform_entropy_nats": math.log(L),
            },
            recommendation=(
                "Scale attention scores by 1/sqrt(d_k) (q @ k.transpose(-2, -1) / sqrt(head_dim), "
                "as F.scaled_dot_product_attention does by default); initialise the q/k "
                "projections with std ~ 0.02 or 1/sqrt(d_model), not 1; consider QK-LayerNorm "
                "for large models. If the weights are pretrained, peaked heads can be legitimate: "
                "skip this check with --skip attn.entropy-collapse."
            ),
        )
    ]
