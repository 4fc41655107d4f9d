"""Clean look-alike of label_leak_own_loss.py: the model's loss shifts (logits[:, :-1] against
labels[:, 1:]), so ``labels = input_ids`` is right, as for a Hugging Face causal LM."""

from __future__ import annotations

from label_leak_own_loss import LM, get_batch  # noqa: F401


def build_model() -> LM:
    return LM(shift=True)
