"""Clean look-alike of label_leak_loss_fn.py: the loss_fn shifts by one."""

from __future__ import annotations

import torch.nn.functional as F
from label_leak_loss_fn import build_model, get_batch  # noqa: F401


def loss_fn(model, input_ids):
    logits = model(input_ids)  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
