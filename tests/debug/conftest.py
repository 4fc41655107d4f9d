"""Fixtures of team B1's debugger tests: the tiny GPT and a CheckContext builder."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

MODELS = Path(__file__).parent / "models"
if str(MODELS) not in sys.path:
    sys.path.insert(0, str(MODELS))


@pytest.fixture
def models_dir() -> Path:
    return MODELS


@pytest.fixture
def tiny_gpt() -> nn.Module:
    from b1_tiny import TinyGPT

    torch.manual_seed(0)
    return TinyGPT().eval()


@pytest.fixture
def make_ctx() -> Callable[..., object]:
    """``make_ctx(model, batch=None, **fields) -> CheckContext`` (tensor batch by default)."""
    from tdiag.debug.context import CheckContext

    def make(model: nn.Module, batch: object = None, **fields: object) -> CheckContext:
        if batch is None:
            batch = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        if isinstance(batch, torch.Tensor):
            fields.setdefault("batch_style", "tensor")
            batch = {"input_ids": batch}
        else:
            fields.setdefault("batch_style", "dict")
        fields.setdefault("vocab_size", 64)
        fields.setdefault("batch_from_file", True)
        return CheckContext(model=model.eval(), batch=dict(batch), **fields)

    return make
