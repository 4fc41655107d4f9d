"""Clean look-alike of label_leak_xy.py: nanoGPT's loader, y = data[i + 1 : i + 1 + block_size]."""

from __future__ import annotations

from label_leak_xy import build_model, load  # noqa: F401


def example_batch():
    return load(1)
