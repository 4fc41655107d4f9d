"""Clean look-alike of pad_loss_labels.py: labels are -100 wherever attention_mask is 0."""

from __future__ import annotations

import torch
from pad_loss_labels import build_model, padded  # noqa: F401


def get_batch() -> dict[str, torch.Tensor]:
    ids, mask = padded()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
