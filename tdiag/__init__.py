"""tdiag: diagnostics and monitoring for training Transformers in PyTorch.

Three ways in: ``tdiag check model.py`` before training, a :class:`Monitor` inside the
training loop, and ``tdiag report RUN_DIR`` after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tdiag.findings import Finding, Severity, TdiagError

__version__ = "0.1.0"

__all__ = ["Finding", "Monitor", "Severity", "TdiagError", "__version__"]

if TYPE_CHECKING:
    from tdiag.monitor import Monitor


def __getattr__(name: str) -> Any:
    # Lazy: importing tdiag for a Finding must not pull in the Monitor's dependencies.
    if name == "Monitor":
        from tdiag.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'tdiag' has no attribute {name!r}")
