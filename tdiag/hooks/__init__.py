"""Forward/backward hooks and attention capture, with on-device statistic buffers.

Shared by the debugger (``tdiag check``), the Monitor and the forensics replay. One module
per collector, every name importable from ``tdiag.hooks``:

- :class:`ActivationRecorder` (``activations.py``): forward hooks on named modules; per
  call, the statistics of the module's output (and optionally of its first input), in
  execution order.
- :class:`GradientRecorder` (``gradients.py``): the gradient w.r.t. each module's output
  (optionally its input) and each parameter's gradient, in the order backward produced them.
- :class:`AttentionCapture` (``attention.py``): a ``TorchFunctionMode`` that sees every
  ``scaled_dot_product_attention`` / attention-like ``softmax`` even in models that do not
  expose their attention probabilities.
- :class:`OpTracer` (``ops.py``): every torch op of a forward, with its module and
  statistics, and the backward node each one made (to name the op that went non-finite).
- ``locate.py``: the one way of naming the first non-finite module (forward or backward)
  and op from what these recorded, used by ``tdiag check`` and by the Monitor's replay.

Rules: hooks never raise in the hot path (a failure is logged once and counted); every
handle is kept and removed on ``detach`` / ``__exit__``; detaching leaves the model as
it was (no hooks, same mode, same ``requires_grad``, same parameters). Statistics stay on
the device until ``to_host()``, which does ONE host sync for all records. When
``enabled`` is False the hooks return after a single attribute check.

Module constants (``ATTN_SAMPLE_ROWS`` …) live in the collector's module: patch
``tdiag.hooks.attention.ATTN_SAMPLE_ROWS`` to change what the capture reads.
"""

from __future__ import annotations

from tdiag.hooks.activations import ActivationRecorder, ModuleRecord
from tdiag.hooks.attention import (
    ATTN_CHUNK_SCORES,
    ATTN_SAMPLE_ROWS,
    ATTN_SAMPLE_SCORES,
    AttentionCall,
    AttentionCapture,
    attention_sample_indices,
)
from tdiag.hooks.common import ModuleFilter, first_float_tensor
from tdiag.hooks.gradients import GradientRecorder, GradRecord

__all__ = [
    "ATTN_CHUNK_SCORES",
    "ATTN_SAMPLE_ROWS",
    "ATTN_SAMPLE_SCORES",
    "ActivationRecorder",
    "AttentionCall",
    "AttentionCapture",
    "GradRecord",
    "GradientRecorder",
    "ModuleFilter",
    "ModuleRecord",
    "attention_sample_indices",
    "first_float_tensor",
]
