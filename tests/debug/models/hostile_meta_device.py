"""A model built on the meta device (``with torch.device("meta"):``), as for deferred
initialisation of a large model: its parameters have shapes but no values, so nothing can be
checked. ``tdiag check`` must say so (exit 2), not crash inside ``model.to(device)``."""

from __future__ import annotations

import torch
from b1_tiny import TinyGPT, get_batch

__all__ = ["build_model", "get_batch"]


def build_model() -> TinyGPT:
    with torch.device("meta"):
        return TinyGPT()
