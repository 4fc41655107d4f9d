"""The registry of debugger checks, keyed by their stable ids.

A check is a pure function ``(ctx: CheckContext) -> list[Finding]`` registered with
:func:`register_check`. A check that does not apply raises :class:`SkipCheck` with the
reason; the runner reports it as skipped. Registering the same id twice raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext
    from tdiag.findings import Finding

__all__ = ["CHECKS", "FAMILY_MODULES", "CheckFn", "CheckSpec", "SkipCheck", "register_check"]

CheckFn = Callable[["CheckContext"], "list[Finding]"]


class SkipCheck(Exception):
    """Raised by a check that does not apply; ``str(exc)`` is the reason shown to the user."""


@dataclass(frozen=True)
class CheckSpec:
    """A registered check.

    Attributes:
        id: stable dotted id (the Finding id it emits; documented in docs/checks.md).
        family: the family module ("data", "init", "numerics", "gradients", ...).
        title: one line saying what it looks for.
        fn: the check function.
        order: registration order (checks of one module run in this order).
    """

    id: str
    family: str
    title: str
    fn: CheckFn
    order: int


#: The modules of tdiag.debug that hold checks, in the order their checks run (a module's
#: checks name their family: ``label_leak`` and ``pad_loss`` hold checks of the "data" family).
FAMILY_MODULES = (
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

#: Every registered check, in the order the runner runs them: the modules of
#: :data:`FAMILY_MODULES` in that order (whichever was imported first), then any other
#: module's checks; within a module, in registration order. Complete once ``tdiag.debug.CHECKS``
#: has been looked up (that imports every family module).
CHECKS: dict[str, CheckSpec] = {}


def _rank(spec: CheckSpec) -> tuple[int, int]:
    package, _, module = spec.fn.__module__.rpartition(".")
    known = package == "tdiag.debug" and module in FAMILY_MODULES
    return (FAMILY_MODULES.index(module) if known else len(FAMILY_MODULES), spec.order)


def register_check(check_id: str, *, family: str, title: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator registering ``fn`` under ``check_id``.

    Raises:
        ValueError: the id is already registered, or is not a dotted string without spaces.
    """
    if not isinstance(check_id, str) or "." not in check_id or " " in check_id:
        raise ValueError(f"check id must be a dotted string without spaces, got {check_id!r}")

    def decorate(fn: CheckFn) -> CheckFn:
        if check_id in CHECKS:
            raise ValueError(
                f"check id {check_id!r} is already registered by {CHECKS[check_id].fn.__module__}"
            )
        CHECKS[check_id] = CheckSpec(check_id, family, title, fn, len(CHECKS))
        ordered = sorted(CHECKS.values(), key=_rank)  # the same order whatever imported first
        CHECKS.clear()
        CHECKS.update((s.id, s) for s in ordered)
        return fn

    return decorate
