"""A file that ends the process with ``os._exit(0)`` while it is imported (a training script
that "cleans up" at module level): no exception, no atexit, exit status 0. ``tdiag check``
must report it as a failure (exit 2), not exit 0 with no output."""

from __future__ import annotations

import os

from b1_tiny import build_model, get_batch

__all__ = ["build_model", "get_batch"]

os._exit(0)
