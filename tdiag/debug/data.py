"""Data checks: the batch itself, before (and without) running the model.

- ``data.token-out-of-range``: ids outside the embedding's rows (or labels outside the
  output vocabulary). Found from the ids alone, so it is reported even though the forward
  would crash (on CUDA as a far-away "device-side assert").
- ``data.labels-all-ignored``: every target is -100 (or a pad): the loss is NaN/0 and
  nothing is learnt.
- ``data.padding-heavy``: most of the batch is padding: compute spent on nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tdiag.debug.context import IGNORE_INDEX
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: Fraction of padded positions above which a batch is "padding-heavy". A judgement: beyond
#: half, more compute goes to pads than to tokens, and length bucketing or packing typically
#: gives a >= 2x speed-up for the same tokens.
PADDING_HEAVY_FRAC = 0.5
#: How many offending positions a finding lists.
MAX_EXAMPLES = 5


def _examples(bad: torch.Tensor, values: torch.Tensor) -> list[dict[str, int]]:
    idx = bad.nonzero()[:MAX_EXAMPLES].tolist()  # host sync (only when something is wrong)
    return [{"row": b, "pos": t, "id": int(values[b, t])} for b, t in idx]


@register_check("data.token-out-of-range", family="data", title="Token ids outside the vocabulary")
def token_out_of_range(ctx: CheckContext) -> list[Finding]:
    limit = ctx.token_limit()
    if limit is None:
        raise SkipCheck("the vocabulary size is unknown (no nn.Embedding, no config.vocab_size)")
    findings = []
    ids = ctx.input_ids
    bad = (ids < 0) | (ids >= limit)
    lo, hi = torch.aminmax(ids)
    n_bad, lo_v, hi_v = torch.stack([bad.sum(), lo, hi]).tolist()  # host sync
    emb = ctx.embedding_module()
    emb_name = ctx.module_name(emb) if emb is not None else None
    if n_bad:
        findings.append(
            Finding(
                id="data.token-out-of-range",
                severity=Severity.ERROR,
                title="Token ids outside the embedding's range",
                message=(
                    f"{n_bad} of {ids.numel()} input ids lie outside [0, {limit}) "
                    f"(min {lo_v}, max {hi_v}); the embedding lookup would fail "
                    "(on CUDA: 'device-side assert triggered', reported far from the cause)."
                ),
                where=emb_name,
                evidence={
                    "vocab_size": limit,
                    "min_id": lo_v,
                    "max_id": hi_v,
                    "n_out_of_range": n_bad,
                    "examples": _examples(bad, ids),
                },
                recommendation=(
                    f"Make the model's vocab_size match the tokenizer: it must be > the largest id "
                    f"({hi_v}); count added special tokens (pad/bos/eos) too, e.g. "
                    "vocab_size = len(tokenizer), or resize the embedding. Negative ids usually "
                    "are a -100 label or -1 pad written into input_ids: pad inputs with a real "
                    "pad id and mask it instead."
                ),
            )
        )
    labels = ctx.batch.get("labels")
    if labels is not None:
        out_v = ctx.cache.get("logits_shape", (0, 0, limit))[-1]
        bad_l = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= out_v))
        n_bad_l = int(bad_l.sum())  # host sync
        if n_bad_l:
            findings.append(
                Finding(
                    id="data.token-out-of-range",
                    severity=Severity.ERROR,
                    title="Labels outside the output vocabulary",
                    message=(
                        f"{n_bad_l} label(s) are neither -100 (ignored) nor in [0, {out_v}); "
                        "cross-entropy would fail."
                    ),
                    where=None,
                    evidence={
                        "output_vocab": out_v,
                        "n_out_of_range": n_bad_l,
                        "examples": _examples(bad_l, labels),
                    },
                    recommendation=(
                        "Use -100 (PyTorch's ignore_index) for positions without a target, "
                        "not the pad id or -1, and keep label ids below the output size."
                    ),
                )
            )
    return findings


@register_check("data.labels-all-ignored", family="data", title="Every label ignored")
def labels_all_ignored(ctx: CheckContext) -> list[Finding]:
    if not ctx.batch_from_file:
        raise SkipCheck("no batch in the file (random ids have no labels to check)")
    targets = ctx.targets()
    if ctx.causal and "labels" not in ctx.batch and not ctx.targets_aligned():
        targets = targets[:, 1:]  # the next-token targets the default loss uses
    valid = targets != IGNORE_INDEX
    per_row = valid.sum(dim=1)
    n_valid, n_rows_empty = torch.stack([valid.sum(), (per_row == 0).sum()]).tolist()  # host sync
    if "labels" in ctx.batch:
        source = "labels"
    elif ctx.targets_aligned():
        source = "targets of the (input_ids, targets) batch"
    else:
        source = "targets derived from input_ids and the mask"
    if n_valid == 0:
        return [
            Finding(
                id="data.labels-all-ignored",
                severity=Severity.ERROR,
                title="Every label is ignored: nothing to learn",
                message=(
                    f"All {targets.numel()} {source} are -100 (or padding); the mean "
                    "cross-entropy is NaN (0/0) or 0, and no gradient reaches the model."
                ),
                evidence={"n_targets": targets.numel(), "n_valid": 0, "source": source},
                recommendation=(
                    "Set labels = input_ids (the model or loss shifts them for next-token "
                    "prediction) and put -100 only on padding / prompt positions; check that the "
                    "attention mask is 1 on real tokens and 0 on pads (not inverted)."
                ),
            )
        ]
    if n_rows_empty:
        return [
            Finding(
                id="data.labels-all-ignored",
                severity=Severity.INFO,
                title="Some samples have no target",
                message=f"{n_rows_empty} of {targets.shape[0]} rows have every label ignored.",
                evidence={"rows_without_target": n_rows_empty, "rows": targets.shape[0]},
                recommendation=(
                    "Drop empty samples (or ones truncated down to the prompt) in the data "
                    "pipeline; they cost compute and contribute nothing."
                ),
            )
        ]
    return []


@register_check("data.padding-heavy", family="data", title="Batch mostly padding")
def padding_heavy(ctx: CheckContext) -> list[Finding]:
    if not ctx.batch_from_file:
        raise SkipCheck("no batch in the file (a random batch has no padding)")
    mask = ctx.attention_mask
    if mask is not None:
        real = mask != 0
    elif ctx.pad_id is not None:
        real = ctx.input_ids != ctx.pad_id
    else:
        raise SkipCheck("the batch has no attention_mask and the model no known pad id")
    lengths = real.sum(dim=1)
    n_real, lo, hi = torch.stack([real.sum(), lengths.min(), lengths.max()]).tolist()  # host sync
    total = real.numel()
    pad_frac = 1.0 - n_real / total
    if pad_frac <= PADDING_HEAVY_FRAC:
        return []
    return [
        Finding(
            id="data.padding-heavy",
            severity=Severity.WARNING,
            title="Most of the batch is padding",
            message=(
                f"{pad_frac:.0%} of the {total} positions are padding (real lengths {lo}-{hi} "
                f"of {real.shape[1]}): that share of the compute is wasted."
            ),
            evidence={
                "pad_fraction": round(pad_frac, 4),
                "threshold": PADDING_HEAVY_FRAC,
                "min_real_length": lo,
                "max_real_length": hi,
                "padded_length": real.shape[1],
            },
            recommendation=(
                "Pad each batch only to its longest sequence (dynamic padding), bucket samples "
                "of similar length together, or pack several sequences per row (with a "
                "block-diagonal mask or position resets); truncate outliers."
            ),
        )
    ]
