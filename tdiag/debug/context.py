"""What a check sees: the model, a batch, and helpers that speak Contract 1's forms.

A check should use :meth:`CheckContext.forward` / :meth:`CheckContext.loss` rather than
call the model itself: they accept the forms a user's file may use (tensor or dict batch;
a logits tensor, a tuple or an object with ``.logits`` / ``.loss``) and validate them.
Checks must not leave ``ctx.model`` changed (the runner restores its train/eval mode);
a check that trains uses :meth:`CheckContext.fresh_model`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdiag.findings import TdiagError
from tdiag.hooks import ActivationRecorder

__all__ = [
    "IGNORE_INDEX",
    "TARGET_PARAM_NAMES",
    "CheckContext",
    "ModelOutputError",
    "logits_from_output",
]

#: The label value cross-entropy ignores (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100

#: Names of a forward parameter that takes next-token targets, as in nanoGPT's
#: ``forward(idx, targets=None)`` (which returns only the last position's logits without them).
TARGET_PARAM_NAMES = ("targets", "target", "labels", "y")


class ModelOutputError(TdiagError):
    """The model's output is not one of the forms Contract 1 accepts, or has the wrong shape."""


def logits_from_output(out: Any) -> torch.Tensor:
    """The logits inside a model output: a Tensor, a tuple ``(logits, ...)`` (or
    ``(loss, logits, ...)`` as Hugging Face returns with labels), a mapping or an object
    with ``.logits``.

    Raises:
        ModelOutputError: no logits tensor found.
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = None
    if isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    elif hasattr(out, "logits") and not isinstance(out, list | tuple):
        logits = out.logits
    elif isinstance(out, list | tuple):
        # first element with >= 2 dims (skips a leading 0-d loss)
        logits = next((t for t in out if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
    if not isinstance(logits, torch.Tensor):
        raise ModelOutputError(
            f"the model returned {type(out).__name__}, which holds no logits tensor; "
            "return logits (B, L, V), a tuple (logits, loss) or an object with .logits"
        )
    return logits


def loss_from_output(out: Any) -> torch.Tensor | None:
    """The loss a model output carries (``.loss``, ``["loss"]``, or a 0-d tensor in a tuple)."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, Mapping):
        loss = out.get("loss")
    elif isinstance(out, list | tuple):
        loss = next((t for t in out if isinstance(t, torch.Tensor) and t.dim() == 0), None)
    else:
        loss = getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def forward_params(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward`` (None when its signature cannot be read)."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # builtins, odd wrappers
        return None


def _dict_call(
    model: nn.Module, batch: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for calling ``model`` on a dict batch: the keys its forward accepts (a
    dict batch may carry ``labels`` for the loss that a forward taking only ``input_ids`` would
    reject; everything when it takes **kwargs). A forward whose first parameter is not called
    ``input_ids`` (``forward(self, x, attention_mask=None)``) gets the ids positionally."""
    params = forward_params(model)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return (), dict(batch)
    names = {p.name for p in params}
    kwargs = {k: v for k, v in batch.items() if k in names}
    if "input_ids" in names:
        return (), kwargs
    return (batch["input_ids"],), kwargs


@dataclass(kw_only=True)
class CheckContext:
    """Everything a check needs.

    Attributes:
        model: the model under check, on ``device``, in eval mode (dropout off: the checks
            compare outputs and must be deterministic). Gradients still flow.
        batch: ``{"input_ids": LongTensor (B, L), "attention_mask"?: (B, L) 1=real 0=pad,
            "labels"?: (B, L) with -100 = ignore}`` on ``device``.
        vocab_size: number of token ids the model accepts, when known.
        causal: True for a decoder (output at t may only see inputs <= t).
        device: where the model and batch live.
        seed: the run's seed.
        user_module: the imported model file (None when built in code).
        decode_with_cache: the file's ``decode_with_cache(model, input_ids) -> logits`` or None.
        make_optimizer: the file's ``make_optimizer(model)`` or None.
        loss_fn: the file's ``loss_fn(model, batch)`` or None.
        factory: builds a new model (the file's factory), or None for a module-level model.
        batch_style: "tensor" (the model is called ``model(input_ids)``), "tuple" (the file's
            batch was ``(input_ids, targets)``; called like "tensor") or "dict"
            (``model(**batch)``, leaving out keys its forward does not accept, e.g. ``labels``
            for a forward taking only ``input_ids``: the default loss then uses them).
        targets_arg: name of the forward parameter given next-token targets (nanoGPT's
            ``targets``), or None. Set by the loader when the forward needs them to return
            the logits of every position; the targets are ``batch["targets"]`` when the file
            gave them, else ``input_ids`` shifted left by one.
        pad_id: the padding token id when known (config ``pad_id`` / ``pad_token_id``).
        batch_from_file: True when the batch came from the file, False when drawn at random.
        cache: scratch space for sharing expensive results between checks.
    """

    model: nn.Module
    batch: dict[str, torch.Tensor]
    vocab_size: int | None = None
    causal: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    user_module: ModuleType | None = None
    decode_with_cache: Callable[..., Any] | None = None
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    factory: Callable[[], nn.Module] | None = None
    batch_style: str = "tensor"
    targets_arg: str | None = None
    pad_id: int | None = None
    batch_from_file: bool = False
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_style not in ("tensor", "tuple", "dict"):
            raise ValueError(
                f"batch_style must be 'tensor', 'tuple' or 'dict', got {self.batch_style!r}"
            )
        if "input_ids" not in self.batch:
            raise ValueError(f"batch needs 'input_ids', got keys {sorted(self.batch)}")

    # -- batch helpers -----------------------------------------------------------------------
    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.batch.get("attention_mask")

    def with_input_ids(self, input_ids: torch.Tensor, **extra: torch.Tensor) -> dict[str, Any]:
        """A copy of the batch with other ``input_ids`` (and any keys in ``extra`` replaced)."""
        b = dict(self.batch)
        b["input_ids"] = input_ids
        b.update(extra)
        return b

    def model_inputs(self, batch: Mapping[str, Any] | None = None) -> Any:
        """The batch in the form the user's file uses (for ``loss_fn``): tensor, tuple or dict."""
        b = self.batch if batch is None else batch
        if self.batch_style == "tensor":
            return b["input_ids"]
        if self.batch_style == "tuple":
            return b["input_ids"], self.next_targets(b)
        return dict(b)

    def next_targets(self, batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Next-token targets aligned with the positions: the file's ``targets`` when its batch
        was ``(input_ids, targets)``, else ``input_ids`` shifted left by one (the last position
        wraps around to the first token: a valid id for any loss)."""
        b = self.batch if batch is None else batch
        t = b.get("targets")
        if isinstance(t, torch.Tensor) and t.shape == b["input_ids"].shape:
            return t
        return b["input_ids"].roll(-1, dims=1)

    # -- running the model -------------------------------------------------------------------
    def call_model(
        self, batch: Mapping[str, Any] | None = None, model: nn.Module | None = None
    ) -> Any:
        """The raw output of the model on ``batch`` (default: ``ctx.batch``)."""
        m = self.model if model is None else model
        b = self.batch if batch is None else batch
        extra = {self.targets_arg: self.next_targets(b)} if self.targets_arg else {}
        if self.batch_style != "dict":
            return m(b["input_ids"], **extra)
        args, kwargs = _dict_call(m, b)
        return m(*args, **kwargs | extra)

    def forward(
        self, batch: Mapping[str, Any] | None = None, model: nn.Module | None = None
    ) -> torch.Tensor:
        """Logits ``(B, L, V)`` of the model on ``batch``, whatever form the model returns.

        Raises:
            ModelOutputError: the output holds no logits, or they are not ``(B, L, V)``.
        """
        b = self.batch if batch is None else batch
        return self._checked_logits(self.call_model(b, model), b)

    def _checked_logits(self, out: Any, b: Mapping[str, Any]) -> torch.Tensor:
        logits = logits_from_output(out)
        ids = b["input_ids"]
        if logits.dim() == 2 and logits.shape[0] == ids.numel() and ids.shape[1] > 1:
            # flattened for the loss, as in logits.view(B * T, C): one row per position
            logits = logits.view(*ids.shape, logits.shape[-1])
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            hint = ""
            if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(ids.shape)[::-1]:
                hint = " (sequence-first: return logits.transpose(0, 1), batch first)"
            elif logits.dim() == 3 and logits.shape[1] == 1 < ids.shape[1]:
                hint = " (the last position only: tdiag needs the logits of every position)"
            raise ModelOutputError(
                f"expected logits of shape (B, L, V) = ({ids.shape[0]}, {ids.shape[1]}, V) for "
                f"input_ids of shape {tuple(ids.shape)}, got {tuple(logits.shape)}{hint}"
            )
        return logits

    def loss(
        self, batch: Mapping[str, Any] | None = None, model: nn.Module | None = None
    ) -> torch.Tensor:
        """The training loss on ``batch``: the file's ``loss_fn``, else the output's ``.loss``,
        else next-token cross-entropy (shifted for causal models) ignoring -100 and pads."""
        m = self.model if model is None else model
        b = self.batch if batch is None else batch
        if self.loss_fn is not None:
            return self.loss_fn(m, self.model_inputs(b))
        out = self.call_model(b, m)
        loss = loss_from_output(out)
        if loss is not None:
            return loss
        return self.default_loss(logits_from_output(out), b)

    def loss_source(self) -> str:
        """Where :meth:`loss` comes from: ``"loss_fn"`` (the file's), ``"output"`` (the model's
        own ``.loss`` on ``ctx.batch``) or ``"default"`` (tdiag's cross-entropy)."""
        if self.loss_fn is not None:
            return "loss_fn"
        return "output" if self.recorded_forward()["loss"] is not None else "default"

    def targets(self, batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Per-position target ids ``(B, L)`` before any shift, with -100 where ignored.

        ``(input_ids, targets)`` batches give targets already aligned with the positions (see
        :meth:`targets_aligned`); their negative values (nanoGPT's -1) count as ignored."""
        b = self.batch if batch is None else batch
        labels = b.get("labels")
        if labels is None and self.targets_aligned(b):
            return b["targets"].masked_fill(b["targets"] < 0, IGNORE_INDEX)
        if labels is None:
            labels = b["input_ids"].clone()
            mask = b.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
            if self.pad_id is not None:
                labels = labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)
        return labels

    def targets_aligned(self, batch: Mapping[str, Any] | None = None) -> bool:
        """True when the batch's targets are already the next tokens (a ``(x, y)`` batch):
        the default loss then does not shift them."""
        b = self.batch if batch is None else batch
        return "labels" not in b and isinstance(b.get("targets"), torch.Tensor)

    def default_loss(
        self, logits: torch.Tensor, batch: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Cross-entropy of ``logits`` (B, L, V) against :meth:`targets` (shifted when causal)."""
        labels = self.targets(batch)
        if self.causal and not self.targets_aligned(batch):
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1).to(logits.device, torch.long),  # int32 ids are fine in a batch
            ignore_index=IGNORE_INDEX,
        )

    def recorded_forward(self) -> dict[str, Any]:
        """One no-grad forward of ``ctx.batch`` with an :class:`~tdiag.hooks.ActivationRecorder`
        (inputs too), cached in ``ctx.cache``: ``{"rows": [to_host() rows in execution order],
        "logits": Tensor (B, L, V), "loss": the output's own loss tensor or None,
        "hook_errors": number of module calls the hooks could not record}``."""
        key = "recorded_forward"
        if key not in self.cache:
            torch.manual_seed(self.seed)
            with ActivationRecorder(self.model, inputs=True) as rec, torch.no_grad():
                out = self.call_model()
                logits = self._checked_logits(out, self.batch)
            self.cache[key] = {
                "rows": rec.to_host(),
                "logits": logits.detach(),
                "loss": loss_from_output(out),
                "hook_errors": rec.errors,
            }
        return self.cache[key]

    def token_limit(self) -> int | None:
        """Number of rows of the token embedding (ids must be below it), else ``vocab_size``."""
        emb = self.embedding_module()
        return emb.num_embeddings if emb is not None else self.vocab_size

    def module_name(self, module: nn.Module) -> str | None:
        """The path of ``module`` in ``named_modules()``, or None."""
        return next((n for n, m in self.model.named_modules() if m is module), None)

    # -- model structure ---------------------------------------------------------------------
    def embedding_module(self) -> nn.Embedding | None:
        """The token embedding: the first ``nn.Embedding`` with ``vocab_size`` rows, else the
        first ``nn.Embedding``, else None."""
        embs = [m for m in self.model.modules() if isinstance(m, nn.Embedding)]
        for m in embs:
            if self.vocab_size is not None and m.num_embeddings == self.vocab_size:
                return m
        return embs[0] if embs else None

    def block_modules(self) -> list[tuple[str, nn.Module]]:
        """The repeated blocks (layers) in depth order: the children of the
        ``nn.ModuleList``/``nn.Sequential`` of >= 2 same-class items that holds the most
        parameters (the stack of layers, not the list of attention heads inside one layer,
        which may be longer); the shallower one on a tie. Empty if none."""
        best: list[tuple[str, nn.Module]] = []
        best_key = (-1, 0)
        for name, m in self.model.named_modules():
            if not isinstance(m, nn.ModuleList | nn.Sequential) or len(m) < 2:
                continue
            kids = list(m.named_children())
            if len({type(k) for _, k in kids}) != 1:
                continue
            key = (sum(p.numel() for p in m.parameters()), -name.count("."))
            if key > best_key:
                prefix = f"{name}." if name else ""
                best, best_key = [(prefix + n, k) for n, k in kids], key
        return best

    def fresh_model(self) -> nn.Module:
        """A new model in its initial state (seeded), on ``device``, in train mode."""
        if self.factory is not None:
            torch.manual_seed(self.seed)
            m = self.factory()
        else:
            # a module-level model cannot be rebuilt; checks never change ctx.model's
            # parameters, so a copy of it is the initial state
            m = copy.deepcopy(self.model)
        return m.to(self.device).train()

    def replace(self, **changes: Any) -> CheckContext:
        """A copy with some fields changed (shares the cache)."""
        new = dataclasses.replace(self, **changes)
        new.cache = self.cache
        return new
