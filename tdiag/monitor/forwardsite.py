"""Where the Monitor sees the model's forward: the root module, or the children the loop calls.

The Monitor's forward hooks (data time, MFU's sequence length and dtype, the forward-based
loop checks, forensics' RNG state, the per-rank forward time, the layer watch's attention
capture and logits) sit on the module it was given. Many loops never call that module: a
LightningModule whose ``training_step`` calls ``self.model(x)``, a wrapper passed to
``Monitor(model=...)`` whose child the loop calls. :class:`ForwardSite` finds out on the
first training forward (gradient enabled):

- the root's own forward ran: the extra hooks are removed at once, nothing else changes;
- a child's forward ran outside any root forward: from then on each *outermost* call of the
  root's top-level modules (its children, looking through ``ModuleList``/``ModuleDict``,
  which have no forward) stands for a forward: a call that starts while no other of them
  runs. Nested calls are one forward; children called in sequence (``self.head(self.emb(x))``,
  ``self.loss(self.model(x), y)``) are several, as micro-batches are: the consumers keep the
  first of a step (data time, inputs) or add them up (forward time). Said in a debug log.

Cost: one Python call per hooked child call (a few per step), none once the root is seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ForwardSite", "top_level_modules"]

logger = logging.getLogger(__name__)


def top_level_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The root's children that can be called, looking through containers without a
    forward (``ModuleList``, ``ModuleDict``) to their children."""
    stack = list(reversed(list(model.named_children())))
    while stack:
        name, module = stack.pop()
        if type(module).forward is nn.Module.forward:  # a container: never called itself
            stack.extend((f"{name}.{n}", m) for n, m in reversed(list(module.named_children())))
        else:
            yield name, module


class _Listener:
    def __init__(self, site: ForwardSite, pre: Callable, post: Callable) -> None:
        self.site, self.pre, self.post = site, pre, post

    def remove(self) -> None:
        if self in self.site._listeners:
            self.site._listeners.remove(self)


class ForwardSite:
    """The root's forward pre-hook calls ``on_forward(module, args, kwargs)`` on every root
    forward, as before; outermost child calls (when the loop calls children directly) call it
    too, and the listeners' ``pre(module, args)`` / ``post(module, args, output)``.

    Listeners (:meth:`listen`) get the child calls only: a consumer keeps its own hooks on
    the root for the usual case, so it is never called twice for one forward.
    """

    def __init__(self, model: nn.Module, on_forward: Callable[[nn.Module, Any, Any], None]):
        self.root = model
        self.mode = "probing"  # then "root" (the root's forward runs) or "children"
        self.chosen: list[str] = []  # the children whose calls stood for a forward
        self._on_forward = on_forward
        self._listeners: list[_Listener] = []
        self._root_depth = 0
        self._depth = 0
        self._root_handle = model.register_forward_pre_hook(self._root_pre, with_kwargs=True)
        self._child_handles: list[Any] = [model.register_forward_hook(self._root_post)]
        for name, module in top_level_modules(model):
            try:
                pre = module.register_forward_pre_hook(self._child_pre(name), with_kwargs=True)
            except (RuntimeError, AttributeError, TypeError) as exc:  # e.g. a ScriptModule
                logger.debug("tdiag: no forward hooks on %r (%s)", name, exc)
                continue
            self._child_handles += [pre, module.register_forward_hook(self._child_post)]

    def listen(self, pre: Callable, post: Callable) -> _Listener:
        """Also call ``pre``/``post`` around each outermost child forward; ``.remove()`` ends it."""
        listener = _Listener(self, pre, post)
        self._listeners.append(listener)
        return listener

    # -- hooks -----------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._root_depth += 1
        if self.mode == "probing" and torch.is_grad_enabled():
            self.mode = "root"
            self._remove_children()
        self._on_forward(module, args, kwargs)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._root_depth = max(0, self._root_depth - 1)

    def _child_pre(self, name: str) -> Callable:
        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self._root_depth:
                return  # inside the root's forward: the root's hook saw it
            self._depth += 1
            if self._depth != 1:
                return
            if self.mode == "probing" and torch.is_grad_enabled():
                self.mode = "children"
                logger.debug(
                    "tdiag: %s's forward is not called; the forwards of its child %r (and "
                    "of any other top-level child called directly) stand for the model's",
                    type(self.root).__name__,
                    name,
                )
            if name not in self.chosen:
                self.chosen.append(name)
            self._on_forward(module, args, kwargs)
            for listener in list(self._listeners):
                listener.pre(module, args)

        return pre

    def _child_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._root_depth or not self._depth:
            return
        self._depth -= 1
        if self._depth == 0:
            for listener in list(self._listeners):
                listener.post(module, args, output)

    # -- the Monitor's calls ---------------------------------------------------------------
    def end_step(self) -> None:
        """At ``mon.step()``: no forward is running (a forward that raised left its count)."""
        self._root_depth = self._depth = 0

    def _remove_children(self) -> None:
        for handle in self._child_handles:
            handle.remove()
        self._child_handles = []

    def remove(self) -> None:
        self._root_handle.remove()
        self._remove_children()
        self._listeners = []
