"""``watch="layers"``: per-layer statistics, gathered through the hooks layer on log steps only.

The Monitor arms a :class:`LayerWatcher` just after the ``step()`` that precedes a log step
and disarms it in the log step's ``step()``: the hooks exist for one training step out of
``log_every``. Between log steps the model carries no tdiag hook at all.

While armed:
- an :class:`RmsRecorder` on every module with parameters (Linear, Embedding, norms,
  ``nn.MultiheadAttention``, and the blocks, attention and MLP modules around them) records its output RMS -> ``act_rms/<module>``, and the first module (in
  execution order) whose output was non-finite;
- an :class:`~tdiag.hooks.AttentionCapture`, entered by a forward pre-hook on the root module
  and left by its forward hook, sees every attention softmax / SDPA ->
  ``attn/entropy/<layer>`` (nats, mean over query rows: at most
  ``tdiag.hooks.ATTN_SAMPLE_ROWS`` evenly spread rows, so the cost is O(rows x L), not
  O(L²)) and ``attn/max_logit/<layer>`` (over the same rows);
- the root module's forward hook takes the output logits (``.logits`` when the output has
  them) -> ``logits/max_abs`` and
  ``logits/log_z`` (mean over positions of ``logsumexp`` over the vocabulary).
With several forwards in one step (gradient accumulation) the last one's values are kept.
Per-layer gradient norms come from :class:`~tdiag.monitor.probe.GradientProbe`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tdiag.hooks import AttentionCapture, first_float_tensor
from tdiag.monitor.metrics import DeviceBatch

__all__ = ["LayerWatcher", "layer_filter"]

logger = logging.getLogger(__name__)


class RmsRecorder:
    """Forward hooks that record ``sqrt(mean(y²))`` of each watched module's output.

    One fused norm per output (``tdiag.hooks.ActivationRecorder`` computes four statistics
    in three passes; the Monitor needs only this one, and NaN/Inf propagate into it, which
    gives the finite flag for free). Values stay on the device; hooks never raise.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: dict[str, torch.Tensor] = {}  # name -> 0-d rms; insertion = execution order
        self._handles: list[Any] = []

    def attach(self) -> None:
        if self._handles:
            return
        for name, module in self.model.named_modules():
            if layer_filter(name, module):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = first_float_tensor(output)
            if out is None or out.numel() == 0:
                return
            try:
                with torch.no_grad():
                    norm = torch.linalg.vector_norm(out.detach(), dtype=torch.float32)
                self.records.pop(name, None)  # the last call wins, in its execution order
                self.records[name] = norm / math.sqrt(out.numel())
            except (RuntimeError, TypeError, ValueError) as exc:
                logger.debug("tdiag: act_rms of %s unavailable: %r", name, exc)

        return hook

    def clear(self) -> None:
        self.records = {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def layer_filter(name: str, module: nn.Module) -> bool:
    """The modules that get ``act_rms/<name>`` (every module but the root that has
    parameters in its subtree and runs a forward of its own):

    - modules that own parameters directly: leaves (Linear, Embedding, norms …) and modules
      such as ``nn.MultiheadAttention`` whose projection weights are their own (its
      ``out_proj`` child never runs its own forward);
    - composites of such modules — a Transformer block (its output is the residual stream
      after the layer), its attention and its MLP — so ``act_rms/blocks.0.attn`` exists
      even when the attention module returns a tuple such as ``(out, probs)``: the first
      floating tensor of the output is measured.

    ``nn.ModuleList``/``nn.ModuleDict`` never run a forward and are left out."""
    if name == "" or isinstance(module, nn.ModuleList | nn.ModuleDict):
        return False
    return next(module.parameters(), None) is not None


def logits_of(output: Any) -> torch.Tensor | None:
    """The logits in a model output: ``.logits`` / ``["logits"]`` (Hugging Face outputs put
    ``loss`` first), else the first floating tensor of at least 2 dims (``(loss, logits)``)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2:
                return item
        return None
    return first_float_tensor(output)


def _attn_layer_name(module_name: str | None, index: int) -> str:
    return module_name if module_name else f"call{index}"


class LayerWatcher:
    """Arm/disarm the per-layer collectors around one training step.

    Args:
        model: the model (its root module's forward is the one watched).
        attention: capture attention statistics.
        logits: take ``logits/*`` from the root module's output (when it is ``(..., V)`` logits).
        site: the Monitor's ForwardSite: the child forwards a loop calls directly count too.
    """

    def __init__(
        self, model: nn.Module, *, attention: bool = True, logits: bool = True, site: Any = None
    ) -> None:
        self.model = model
        self.site = site  # a ForwardSite: also the child forwards a loop calls directly
        self.attention = attention
        self.logits = logits
        self.armed = False
        self._acts = RmsRecorder(model)
        self._capture: AttentionCapture | None = None
        self._capture_active = False
        self._kept_calls: list[Any] = []
        self._handles: list[Any] = []
        self._logit_stats: torch.Tensor | None = None

    def arm(self) -> None:
        if self.armed:
            return
        self._acts.clear()
        self._acts.attach()
        self._logit_stats = None
        if self.attention:
            self._capture = AttentionCapture(model=self.model)
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        if self.site is not None:
            self._handles.append(self.site.listen(self._pre, self._post))
        self.armed = True

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._capture is not None and not self._capture_active:
            # The last forward of the step that ran attention wins (a loss module called
            # after the network, ForwardSite's child forwards, keeps the network's).
            self._kept_calls = list(self._capture.calls)
            self._capture.clear()
            self._capture.__enter__()
            self._capture_active = True

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._exit_capture()
        if not self.logits:
            return
        try:
            out = logits_of(output)
            if out is None or out.dim() < 2:
                return
            with torch.no_grad():
                x = out.detach().float()
                # (..., V): max |logit| and mean log-partition function log Z = logsumexp over V
                self._logit_stats = torch.stack([x.abs().amax(), torch.logsumexp(x, dim=-1).mean()])
        except (RuntimeError, TypeError, ValueError) as exc:
            logger.debug("tdiag: logit statistics unavailable: %r", exc)

    def _exit_capture(self) -> None:
        if self._capture is not None and self._capture_active:
            self._capture_active = False
            self._capture.__exit__(None, None, None)
            if not self._capture.calls:
                self._capture.calls.extend(self._kept_calls)
            self._kept_calls = []

    def disarm(self) -> None:
        """Remove every hook and leave any capture mode (safe after a failed forward)."""
        self._exit_capture()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._acts.detach()
        self.armed = False

    # -- results ---------------------------------------------------------------------------
    def add_to(self, batch: DeviceBatch) -> dict[str, Any]:
        """Put the armed step's device values into ``batch``; returns the layout for
        :meth:`metrics`. Activation stats are averaged over ranks (finite flags: min)."""
        layout: dict[str, Any] = {"acts": [], "attn": []}
        records = self._acts.records
        if records:
            dev = next(iter(records.values())).device
            rms = torch.stack([v.to(dev) for v in records.values()])
            batch.add("layers/act_rms", rms, "mean")
            layout["acts"] = list(records)
        calls = self._capture.calls if self._capture is not None else []
        if calls:
            names = [_attn_layer_name(c.module_name, c.index) for c in calls]
            dev = calls[0].entropy.device
            batch.add(
                "layers/attn_entropy", torch.stack([c.entropy.to(dev) for c in calls]), "mean"
            )
            has_max = [c.max_logit is not None for c in calls]
            if any(has_max):
                maxes = [c.max_logit.to(dev) for c in calls if c.max_logit is not None]
                batch.add("layers/attn_max_logit", torch.stack(maxes), "max")
            layout["attn"] = list(zip(names, has_max, strict=True))
        if self._logit_stats is not None:
            batch.add("layers/logits_max_abs", self._logit_stats[0], "max")
            batch.add("layers/logits_log_z", self._logit_stats[1], "mean")
        return layout

    @staticmethod
    def metrics(host: Mapping[str, Any], layout: Mapping[str, Any]) -> dict[str, float]:
        """``act_rms/<m>``, ``attn/entropy/<l>``, ``attn/max_logit/<l>``, ``logits/*``."""
        out: dict[str, float] = {}
        for name, v in zip(layout.get("acts", []), host.get("layers/act_rms", []), strict=False):
            out[f"act_rms/{name}"] = v
        ent = iter(host.get("layers/attn_entropy", []))
        mx = iter(host.get("layers/attn_max_logit", []))
        for name, has_max in layout.get("attn", []):
            out[f"attn/entropy/{name}"] = next(ent)
            if has_max:
                out[f"attn/max_logit/{name}"] = next(mx)
        if "layers/logits_max_abs" in host:
            out["logits/max_abs"] = host["layers/logits_max_abs"][0]
            out["logits/log_z"] = host["layers/logits_log_z"][0]
        return out

    @staticmethod
    def first_nonfinite_module(host: Mapping[str, Any], layout: Mapping[str, Any]) -> str | None:
        """The first module (execution order) whose output had a NaN/Inf; None when none
        did, or when all did (the parameters were already NaN: the order says nothing)."""
        names = layout.get("acts", [])
        values = host.get("layers/act_rms", [])
        bad = [n for n, v in zip(names, values, strict=False) if not math.isfinite(v)]
        return bad[0] if bad and len(bad) < len(names) else None
