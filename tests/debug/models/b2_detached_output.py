"""Fault: the logits are detached from the graph, so no parameter can learn."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


class DetachedOut(GPT):
    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask).detach()


def build_model() -> GPT:
    return DetachedOut()
