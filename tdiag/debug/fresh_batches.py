"""Fresh random batches shaped like the file's, for ``data.label-leak``.

Random token ids carry no information, so a model trained on them cannot learn to predict
them; but the labels must relate to the ids as the file's do (``labels = input_ids`` for a
Hugging Face model that shifts, nanoGPT's ``y`` already shifted, a masked LM's labels under
``[MASK]``), or the probe would test another setup than the file's. :func:`label_relation`
finds that relation in the file's batch; :class:`FreshBatches` draws new batches with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tdiag.debug.context import IGNORE_INDEX

__all__ = ["SHIFTS", "FreshBatches", "LabelRelation", "cut_batch", "label_relation"]

#: The relations looked for between a batch's labels and its input ids: label[t] is the
#: input at t (Hugging Face style: the model or the loss shifts), at t + 1 (already shifted,
#: nanoGPT's y) or at t - 1 (shifted by hand the wrong way, ``input_ids.roll(1)``).
SHIFTS = (0, 1, -1)


@dataclass(frozen=True)
class LabelRelation:
    """How a label tensor of the file's batch follows from its ``input_ids``.

    Attributes:
        key: "labels" or "targets" (the ``y`` of an ``(x, y)`` batch).
        shift: s such that ``label[t] == input_ids[t + s]`` at most labelled positions: 0
            (Hugging Face style, the model or the loss shifts), 1 (already shifted) or -1.
        labels: the file's labels, cut to the probe's shape.
        ignore_value: what the file writes where there is no target (-100, or nanoGPT's -1).
        follows: (b, l) positions whose label is the input id at ``t + shift``.
        hidden: (b, l) valid positions whose label is not (a masked LM's [MASK] positions).
    """

    key: str
    shift: int
    labels: torch.Tensor
    ignore_value: int
    follows: torch.Tensor
    hidden: torch.Tensor


def label_relation(key: str, ids: torch.Tensor, labels: torch.Tensor) -> LabelRelation:
    """The shift s in (0, 1, -1) for which ``labels[t] == ids[t + s]`` holds most often."""
    valid = labels >= 0
    matches = {}
    for shift in SHIFTS:
        derived = ids.roll(-shift, dims=1)
        m = valid & (labels == derived)
        if shift > 0:
            m[:, -shift:] = False  # rolled around from the other end
        elif shift < 0:
            m[:, :-shift] = False
        matches[shift] = m
    negative = labels[~valid]
    counts = torch.stack([m.sum() for m in matches.values()]).tolist()  # host sync
    shift = SHIFTS[counts.index(max(counts))]  # ties: the first, 0
    default_ignore = IGNORE_INDEX if key == "labels" else -1
    ignore_value = int(negative[0]) if negative.numel() else default_ignore  # host sync
    follows = matches[shift]
    return LabelRelation(key, shift, labels, ignore_value, follows, valid & ~follows)


@dataclass(frozen=True)
class FreshBatches:
    """Draws fresh uniformly random batches shaped like ``template`` (a batch of the file):
    ``input_ids`` from ``[0, n_ids)`` without the pad id; each label tensor of ``relations``
    rebuilt from the new ids by the same relation (-100 kept where the file has it, an
    independent random label, with the file's own input token kept for a shift of 0, where the
    file's label is none of the inputs); ``attention_mask`` all ones (no padding).

    Attributes:
        template: the file's batch, cut to the probe's shape.
        relations: one per label tensor of the template ("labels", "targets").
        n_ids: ids and labels are drawn from ``[0, n_ids)``.
        pad_id: never drawn (None: no pad id).
        bidirectional: labels equal to the visible input (shift 0) become ignored: a
            bidirectional model sees those positions by design.
    """

    template: dict[str, Any]
    relations: tuple[LabelRelation, ...]
    n_ids: int
    pad_id: int | None
    bidirectional: bool

    @property
    def n_choices(self) -> int:
        """How many ids are drawn from: V of the ln V no model can beat on them."""
        return self.n_ids - (self.pad_id is not None and 0 <= self.pad_id < self.n_ids)

    def n_targets(self, batch: dict[str, Any]) -> int:
        """Targets in a probe batch: its labels that are not ignored, else every position."""
        if self.relations:
            return int((batch[self.relations[0].key] >= 0).sum())  # host sync
        return int(batch["input_ids"].numel())

    def _draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        r = torch.randint(0, self.n_choices, shape, generator=gen)
        if self.pad_id is not None and 0 <= self.pad_id < self.n_ids:
            r = r + (r >= self.pad_id).long()  # skip the pad id
        return r

    def batch(self, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        """A new batch, drawn on the CPU from ``gen`` and moved to ``device``."""
        ref = self.template["input_ids"]
        ids = self._draw(tuple(ref.shape), gen)
        out = dict(self.template)
        for rel in self.relations:
            lab = rel.labels.cpu().clone()
            derived = ids.roll(-rel.shift, dims=1)
            follows, hidden = rel.follows.cpu(), rel.hidden.cpu()
            lab[follows] = derived[follows]
            lab[hidden] = self._draw((int(hidden.sum()),), gen)  # independent of every input
            if rel.shift == 0:
                # keep the file's token where its label is not the input (a [MASK] id)
                ids[hidden] = ref.cpu()[hidden].to(ids.dtype)
                if self.bidirectional:
                    # a bidirectional model sees these positions by design: only the hidden
                    # (masked) positions can be judged
                    lab[follows] = rel.ignore_value
            out[rel.key] = lab.to(device, rel.labels.dtype)
        out["input_ids"] = ids.to(device, ref.dtype)
        if "attention_mask" in out:  # no padding: every position is a real token
            out["attention_mask"] = torch.ones_like(out["attention_mask"])
        return out


def cut_batch(batch: Mapping[str, Any], rows: int, seq: int) -> dict[str, Any]:
    """The first ``rows`` samples and ``seq`` positions of every ``(B, L)`` tensor of ``batch``."""
    B, L = batch["input_ids"].shape
    return {
        k: v[:rows, :seq]
        if isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (B, L)
        else v
        for k, v in batch.items()
    }
