"""Read the loss a framework computes, without a host sync: a forward hook on the model
that keeps ``output.loss`` (detached) and the number of input tokens of each micro-batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LossTap"]


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, tuple | list) and output:
        first = output[0]
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            loss = first
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def _tokens_of(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0  # numel: shape only, no sync


class LossTap:
    """Forward hooks on ``model`` collecting each training forward's loss and token count.

    ``take()`` returns the step's loss (a device tensor) and the tokens since the last call.
    Forwards under ``torch.no_grad()`` (evaluation) are ignored.
    """

    def __init__(self, model: nn.Module) -> None:
        self._losses: list[torch.Tensor] = []
        self._tokens = 0
        # transformers >= 4.46 passes ``num_items_in_batch``: each micro-batch's loss is then
        # already divided by the tokens of the whole accumulated batch, so the step's loss is
        # the sum of the micro-batch losses, not their mean.
        self._summed = False
        self.batch: dict[str, Any] | None = None  # the last training forward's inputs
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.batch = dict(kwargs) if kwargs and not args else None  # for forensics
            self._tokens += _tokens_of(args, kwargs)
            self._summed = kwargs.get("num_items_in_batch") is not None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.is_grad_enabled():
            loss = _loss_of(output)
            if loss is not None:
                self._losses.append(loss.detach())

    def take(self) -> tuple[torch.Tensor | None, int]:
        losses, tokens = self._losses, self._tokens
        self._losses, self._tokens = [], 0
        if not losses:
            return None, tokens
        if len(losses) == 1:
            return losses[0], tokens
        stacked = torch.stack(losses)
        return (stacked.sum() if self._summed else stacked.mean()), tokens

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
