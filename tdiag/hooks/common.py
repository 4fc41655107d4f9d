"""What the collectors share: the hook owner (handles kept, removed on detach; a failing hook
logs once and records nothing), ``first_float_tensor`` and the default module filter."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

__all__ = ["ModuleFilter", "first_float_tensor"]

logger = logging.getLogger("tdiag.hooks")

ModuleFilter = Callable[[str, nn.Module], bool]

# Errors a statistic can raise on exotic tensors (sparse, meta, nested...): the hook records
# nothing for that call instead of breaking the user's forward/backward.
_HOOK_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)
#: Length of the error quoted in the one warning a failing hook logs.
_MAX_ERROR_CHARS = 200


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a dispatcher error such as "Could not run
    'aten::aminmax' with arguments from the 'NestedTensorCPU' backend" goes on to list every
    backend over ~90 lines)."""
    first = str(exc).strip().split("\n", 1)[0]
    if len(first) > _MAX_ERROR_CHARS:
        first = first[: _MAX_ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {first}"


def first_float_tensor(obj: Any, _depth: int = 0) -> torch.Tensor | None:
    """The first floating-point tensor inside a module output or input.

    Looks into tensors, tuples/lists, mappings (incl. Hugging Face ``ModelOutput``), objects
    with ``.logits`` / ``.last_hidden_state`` and dataclasses, two levels deep.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if _depth > 2 or obj is None:
        return None
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, list | tuple):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        values = [getattr(obj, a, None) for a in ("logits", "last_hidden_state")]
    for v in values:
        found = first_float_tensor(v, _depth + 1)
        if found is not None:
            return found
    return None


def _default_filter(name: str, module: nn.Module) -> bool:
    return name != ""  # every named submodule, not the root


class _HookOwner:
    """Keeps hook handles; removes all of them on detach."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.enabled = True
        self.errors = 0  # hook calls that failed and recorded nothing

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook_failed(self, where: str, exc: BaseException) -> None:
        if self.errors == 0:
            logger.warning(
                "tdiag hook on %s could not record (%s); recording nothing", where, _one_line(exc)
            )
        self.errors += 1

    def detach(self) -> None:
        """Remove every hook this object registered. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        self.attach()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class ModuleStackMode(TorchFunctionMode):
    """A TorchFunctionMode that knows which module a call comes from: forward pre/post
    hooks on every module of ``model`` keep a stack of module names while the mode is on
    (``self._stack[-1]`` is the innermost). ``skip_root`` leaves the root module ("") out."""

    def __init__(self, model: nn.Module | None = None, *, skip_root: bool = False) -> None:
        super().__init__()
        self.model = model
        self._skip_root = skip_root
        self._stack: list[str] = []
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Any:
        if self.model is not None:
            for name, module in self.model.named_modules():
                if name or not self._skip_root:
                    self._handles.append(module.register_forward_pre_hook(self._push(name)))
                    self._handles.append(module.register_forward_hook(self._pop(name)))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _push(self, name: str) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple) -> None:
            self._stack.append(name)

        return pre

    def _pop(self, name: str) -> Callable[..., None]:
        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return post
