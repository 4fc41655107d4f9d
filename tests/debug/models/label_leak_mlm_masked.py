"""Clean look-alike of label_leak_mlm.py: the loss counts only the masked positions."""

from __future__ import annotations

from label_leak_mlm import CAUSAL, build_model, get_batch, mlm_loss  # noqa: F401


def loss_fn(model, input_ids):
    return mlm_loss(model, input_ids, score_all=False)
