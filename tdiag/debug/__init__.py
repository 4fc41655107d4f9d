"""The debugger: ``tdiag check model.py`` runs registered checks on a model before training.

Importing this package registers every check family (one module per family). The families
of team B2 are imported when present so that the package works while they are written.
"""

from __future__ import annotations

import importlib
import logging

from tdiag.debug.context import CheckContext
from tdiag.debug.registry import CHECKS, CheckSpec, SkipCheck, register_check

__all__ = ["CHECKS", "CheckContext", "CheckSpec", "SkipCheck", "register_check"]

logger = logging.getLogger(__name__)

#: The check modules, in the order their checks run (a module's checks name their family:
#: ``label_leak`` and ``pad_loss`` hold checks of the "data" family).
_FAMILIES = (
    "data",
    "pad_loss",
    "label_leak",
    "init",
    "numerics",
    "gradients",
    "structure",
    "attention",
    "sanity",
)

for _family in _FAMILIES:
    try:
        importlib.import_module(f"tdiag.debug.{_family}")
    except ModuleNotFoundError as _exc:
        # only a family module that does not exist (yet) is tolerated, not a broken import inside it
        if _exc.name != f"tdiag.debug.{_family}":
            raise
        logger.debug("check family %s not available", _family)
