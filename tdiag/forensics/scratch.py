"""Scratch copies of the user's model and optimizer, for a replay that must not touch them.

``copy.deepcopy`` gives the structure (any module class, any optimizer class); the caller
then loads a snapshot's state into the copies. Hooks are not carried over: a deep copy of a
module keeps its hook dicts, which hold the live Monitor's closures (its loop checks, the
gradient probe), and a replay must not feed the live run's monitoring. Objects in
``detach`` (e.g. a Lightning module's trainer) become None in the copy instead of being
copied along.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["scratch_model", "scratch_optimizer", "unwrap_model"]

# nn.Module attributes holding hooks (OrderedDicts keyed by handle id).
_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / ``DataParallel`` wrapper (``.module``), else the model."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
    ):
        return inner
    return model


def _empty_hook_dicts(obj: Any, attrs: tuple[str, ...], memo: dict[int, Any]) -> None:
    """Have ``copy.deepcopy(..., memo)`` put a fresh empty dict where ``obj`` holds hooks."""
    for attr in attrs:
        hooks = getattr(obj, attr, None)
        if isinstance(hooks, dict):
            memo[id(hooks)] = type(hooks)()


def _strip_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for attr in _MODULE_HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if isinstance(hooks, dict):
                hooks.clear()


def scratch_model(
    model: nn.Module, *, detach: Iterable[Any] = ()
) -> tuple[nn.Module, dict[int, Any]]:
    """A deep copy of ``model`` without hooks, in the same mode.

    Args:
        model: the live model (left untouched).
        detach: objects referenced from the model that the copy must not carry (they become
            None in it), e.g. a Lightning trainer.

    Returns:
        ``(copy, memo)``: ``memo`` maps ``id(live parameter)`` to the copy's parameter (pass
        it to :func:`scratch_optimizer`).
    """
    memo: dict[int, Any] = {id(o): None for o in detach if o is not None}
    # The hook dicts are replaced by empty ones *before* copying: a hook may be a bound
    # method whose object (the live Monitor, with its open files) cannot be copied.
    for module in model.modules():
        _empty_hook_dicts(module, _MODULE_HOOK_DICTS, memo)
    clone = copy.deepcopy(model, memo)
    _strip_hooks(clone)
    for p in clone.parameters():
        p.grad = None
    return clone, memo


def scratch_optimizer(optimizer: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``optimizer`` over the scratch model's parameters (``memo`` from
    :func:`scratch_model`), without its step/state hooks. None for None."""
    if optimizer is None:
        return None
    _empty_hook_dicts(optimizer, _OPTIMIZER_HOOK_DICTS, memo)
    opt = copy.deepcopy(optimizer, memo)
    for attr in _OPTIMIZER_HOOK_DICTS:
        hooks = getattr(opt, attr, None)
        if isinstance(hooks, dict):
            hooks.clear()
    return opt
