"""A clean GPT whose position embedding is frozen on purpose (requires_grad=False): not a finding."""

from __future__ import annotations

from b2_gpt import GPT, get_batch  # noqa: F401


def build_model() -> GPT:
    model = GPT()
    model.pos.weight.requires_grad_(False)
    return model
