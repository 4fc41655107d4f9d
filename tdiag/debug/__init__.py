"""The debugger: ``tdiag check model.py`` runs registered checks on a model before training.

Looking up ``tdiag.debug.CHECKS`` (``from tdiag.debug import CHECKS``) imports every check
family (one module per family, :data:`~tdiag.debug.registry.FAMILY_MODULES`), which imports
torch. Importing the package itself does not: ``tdiag check`` starts the process that runs
the checks before torch is imported (see :mod:`tdiag.debug.worker`), and the modules it needs
for that (``command``, ``worker``, ``results``, ``usercode``, ``render``, ``registry``) are
torch-free. The families of team B2 are imported when present so that the package works
while they are written.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext
    from tdiag.debug.registry import CHECKS, CheckSpec, SkipCheck, register_check

__all__ = ["CHECKS", "CheckContext", "CheckSpec", "SkipCheck", "register_check"]

logger = logging.getLogger(__name__)

_HOME = {
    "CHECKS": "tdiag.debug.registry",
    "CheckSpec": "tdiag.debug.registry",
    "SkipCheck": "tdiag.debug.registry",
    "register_check": "tdiag.debug.registry",
    "CheckContext": "tdiag.debug.context",
}


def _import_families() -> None:
    from tdiag.debug.registry import FAMILY_MODULES

    for family in FAMILY_MODULES:
        try:
            importlib.import_module(f"tdiag.debug.{family}")
        except ModuleNotFoundError as exc:
            # only a family module that does not exist (yet) is tolerated, not a broken import
            # inside it
            if exc.name != f"tdiag.debug.{family}":
                raise
            logger.debug("check family %s not available", family)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562), so that the torch-free modules of the package import without torch.
    if name not in _HOME:
        raise AttributeError(f"module 'tdiag.debug' has no attribute {name!r}")
    if name == "CHECKS":
        _import_families()
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # looked up once
    return value
