"""The tiny GPT whose ``decode_with_cache`` never returns: only ``kvcache.mismatch`` calls it,
so the checks before it finish and the ones after it are never reached (``--timeout`` test)."""

from __future__ import annotations

import time

from b1_tiny import build_model, get_batch

__all__ = ["build_model", "decode_with_cache", "get_batch"]


def decode_with_cache(model, input_ids):
    while True:  # a decode loop whose stop condition is never met
        time.sleep(0.05)
