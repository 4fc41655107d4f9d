"""``data.pad-in-loss``: are padded positions counted in the loss?

Two views of the file's batch, the second deciding when it can run:

- the labels: where ``attention_mask == 0`` (or the row ends/starts with pad ids), a label that
  is not ignored (-100, or negative for an ``(x, y)`` batch's targets) is a target the loss
  may count;
- the loss itself: one forward and backward of the training loss (the file's ``loss_fn``, the
  model's own ``.loss``, else tdiag's cross-entropy) with the gradient taken with respect to
  the logits the model returns (``torch.autograd.grad``: no ``.grad`` is touched). A position
  counts in the loss exactly when that gradient is not zero there: cross-entropy's gradient is
  ``softmax - onehot``, never zero at a counted position, exactly zero at an ignored or
  masked-out one, whatever the logits (a zero-initialised head too). This catches a
  ``loss_fn`` that builds its targets from ``input_ids`` without masking, and stays quiet for a
  loss with ``ignore_index=pad_id`` or one that masks with the attention mask.

Only pad positions whose target is a pad under either convention are judged: a pad followed
by a pad (or at the end). With left padding the last pad is followed by the first real token,
which a shifted loss predicts from it (as Hugging Face does): that is not a pad target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tdiag.debug.context import ModelOutputError, logits_from_output
from tdiag.debug.probes import controlled
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: Error when padded targets make up at least this share of the targets the loss counts,
#: warning below. A judgement: predicting a pad after a pad is learnt within a few hundred
#: steps, so the counted pads pull the reported loss towards 0 by about this share (a loss of
#: 3.0 reads 2.7 at 10 %), hiding real differences between runs and wasting that share of the
#: gradient signal; below it the bias is within run-to-run noise, but the bug is still there.
ERROR_FRAC = 0.1

#: A position counts in the loss when the gradient at its logits exceeds this fraction of the
#: largest one. Counted positions of a mean cross-entropy all have gradients of about 1/N;
#: ignored ones are exactly 0. The margin only absorbs float dust.
GRAD_RTOL = 1e-3


def _edge_runs(is_pad: torch.Tensor) -> torch.Tensor:
    """The pad ids that form a run at the end (right padding) or start (left padding) of their
    row; a pad id in the middle may be a real token (GPT-2's pad is its end-of-text)."""
    trailing = is_pad.flip(1).long().cumprod(1).flip(1).bool()
    leading = is_pad.long().cumprod(1).bool()
    return trailing | leading


def _pads(ctx: CheckContext) -> tuple[torch.Tensor, str]:
    mask = ctx.attention_mask
    if mask is not None:
        return mask == 0, "attention_mask == 0"
    if ctx.pad_id is not None:
        return _edge_runs(ctx.input_ids == ctx.pad_id), f"pad id {ctx.pad_id} at the row ends"
    raise SkipCheck("the batch has no attention_mask and the model no known pad id")


def _label_key(ctx: CheckContext) -> str | None:
    if "labels" in ctx.batch:
        return "labels"
    return "targets" if ctx.targets_aligned() else None


def _logit_grads(ctx: CheckContext) -> torch.Tensor | None:
    """``(B, L)`` max |d loss / d logits| per position for the file's batch, or None when no
    gradient reaches the logits the model returns (or the loss is not finite)."""
    B, L = ctx.input_ids.shape
    seen: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, out: Any) -> None:
        try:
            logits = logits_from_output(out)
        except ModelOutputError:
            return
        if logits.requires_grad:
            seen.append(logits)

    handle = ctx.model.register_forward_hook(keep)
    try:
        with torch.enable_grad(), controlled(ctx.model, train=False, seed=ctx.seed):
            loss = ctx.loss()
    finally:
        handle.remove()
    if not seen or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return None
    if not bool(torch.isfinite(loss.detach()).all()):  # host sync
        return None
    grads = torch.autograd.grad(loss.sum(), seen, allow_unused=True)
    per_pos: torch.Tensor | None = None
    for g in grads:
        if g is None:
            continue
        if g.dim() == 2 and g.shape[0] == B * L:  # flattened (B·L, V)
            g = g.view(B, L, -1)
        if g.dim() != 3 or tuple(g.shape[:2]) != (B, L):
            continue
        g = g.detach().float().abs().amax(-1)  # (B, L)
        per_pos = g if per_pos is None else torch.maximum(per_pos, g)
    return per_pos


@dataclass(frozen=True)
class _Counted:
    """Pads found among the targets: ``hits`` of the ``judged`` pads, out of the ``targets``
    the loss scores; ``source`` is the loss that was differentiated (None: labels only)."""

    hits: int
    judged: int
    targets: int
    example: dict[str, int]
    source: str | None


def _example(where: torch.Tensor, values: torch.Tensor | None) -> dict[str, int]:
    b, t = where.nonzero()[0].tolist()  # host sync (only when something was found)
    out = {"row": b, "pos": t}
    if values is not None:
        out["label"] = int(values[b, t])
    return out


def _by_gradient(
    pads: torch.Tensor, grads: torch.Tensor, labels: torch.Tensor | None, source: str
) -> _Counted | None:
    nxt_pad = torch.ones_like(pads)
    nxt_pad[:, :-1] = pads[:, 1:]
    judged = pads & nxt_pad  # pads whose target is a pad, whether the loss shifts or not
    counted = grads > GRAD_RTOL * grads.max().clamp_min(1e-30)
    hits = judged & counted
    n_hits, n_judged, n_counted = torch.stack(
        [hits.sum(), judged.sum(), counted.sum()]
    ).tolist()  # host sync
    if n_hits == 0:
        return None  # the loss ignores them (ignore_index = pad id, or a mask)
    return _Counted(n_hits, n_judged, n_counted, _example(hits, labels), source)


def _by_labels(pads: torch.Tensor, labels: torch.Tensor | None) -> _Counted | None:
    if labels is None:
        return None
    at_pads = (labels >= 0) & pads
    n_hits, n_pads, n_targets = torch.stack(
        [at_pads.sum(), pads.sum(), (labels >= 0).sum()]
    ).tolist()  # host sync
    if n_hits == 0:
        return None
    return _Counted(n_hits, n_pads, n_targets, _example(at_pads, labels), None)


@register_check("data.pad-in-loss", family="data", title="Padding counted in the loss")
def check_pad_in_loss(ctx: CheckContext) -> list[Finding]:
    """The gradient of the loss at the pads' logits; the labels at pads when it cannot run."""
    if not ctx.batch_from_file:
        raise SkipCheck("no batch in the file (a random batch has no padding)")
    pads, marked_by = _pads(ctx)
    if not bool(pads.any()):  # host sync
        raise SkipCheck(f"the batch has no padding ({marked_by} nowhere)")
    key = _label_key(ctx)
    labels = ctx.batch[key] if key else None
    blocked = ctx.cache.get("blocked")
    if blocked and labels is None:
        raise SkipCheck(blocked)
    source = None if blocked else ctx.loss_source()
    if source == "default" and labels is None:
        raise SkipCheck(
            "no labels in the batch and no loss of the file's own: tdiag's default "
            "cross-entropy ignores padding by construction"
        )
    grads = None if source is None else _logit_grads(ctx)
    if grads is not None:
        found = _by_gradient(pads, grads, labels, source)
    else:
        found = _by_labels(pads, labels)
    if found is None:
        return []
    n_static = None if labels is None else int(((labels >= 0) & pads).sum())  # host sync
    return [_finding(found, marked_by=marked_by, key=key, n_static=n_static)]


#: How a finding names the loss it looked at (keys: CheckContext.loss_source()).
LOSS_NAMES = {
    "loss_fn": "the file's loss_fn",
    "output": "the model's own loss (output.loss)",
    "default": "tdiag's cross-entropy on the batch's labels (ignore_index=-100)",
}

#: What a finding adds when the loss seen is not the file's own.
_HEDGES = {
    "default": " Your training loss may differ: this is tdiag's default loss on the labels.",
    None: (
        " Seen in the labels only (no gradient of the loss reaches the logits): a loss with "
        "ignore_index=pad_id would not count them."
    ),
}


def _finding(found: _Counted, *, marked_by: str, key: str | None, n_static: int | None) -> Finding:
    share = found.hits / max(found.targets, 1)
    own = found.source in ("loss_fn", "output")
    severity = Severity.ERROR if own and share >= ERROR_FRAC else Severity.WARNING
    loss_name = LOSS_NAMES[found.source] if found.source else f"a loss on the {key}"
    ex = found.example
    label_note = f"; {key} there is {ex['label']}, not -100" if "label" in ex else ""
    return Finding(
        id="data.pad-in-loss",
        severity=severity,
        title="Padding is counted in the loss",
        message=(
            f"{'At least ' if found.source else ''}{found.hits} of the {found.judged} padded "
            f"positions ({marked_by}) count as targets in {loss_name}: {share:.0%} of the "
            f"{found.targets} targets it scores are padding (e.g. row {ex['row']}, position "
            f"{ex['pos']}{label_note}). The model learns to predict padding, and the loss reads "
            f"lower than the real one.{_HEDGES.get(found.source, '')}"
        ),
        evidence={
            "pads_in_loss": found.hits,
            "pad_positions": found.judged,
            "fraction_of_pads": round(found.hits / max(found.judged, 1), 4),
            "fraction_of_loss_targets": round(share, 4),
            "loss_targets": found.targets,
            "error_threshold": ERROR_FRAC,
            "example": ex,
            "padding": marked_by,
            "probe": "gradient of the loss at the logits" if found.source else f"{key} only",
            "loss": loss_name,
        }
        | ({"labels_not_ignored_at_pads": n_static} if n_static is not None else {}),
        recommendation=(
            "Put -100 in the labels wherever the attention mask is 0: "
            "labels = input_ids.masked_fill(attention_mask == 0, -100) (Hugging Face's "
            "DataCollatorForLanguageModeling(tokenizer, mlm=False) does it; "
            "DataCollatorWithPadding does not touch labels). In a custom loss, pass "
            "ignore_index=-100 (or ignore_index=pad_id) to F.cross_entropy, or mask it: "
            "(ce * mask).sum() / mask.sum() with the mask shifted like the targets."
        ),
    )
