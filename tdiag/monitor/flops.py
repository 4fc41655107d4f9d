"""Model FLOPs per token, peak FLOP/s of the device, and MFU.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, "PaLM", appendix B) is
``tokens_per_sec * flops_per_token / peak_flops``: the fraction of the device's dense peak
that the model's own arithmetic would need at the measured throughput. Recomputation
(activation checkpointing) does not count, so MFU never exceeds 1 against a true peak.

A peak is either looked up in a table of vendor datasheet numbers (dense, no sparsity), or
measured (CPU: a timed matmul), or given by the user. An unknown GPU gets no peak and no
MFU, with the reason: a guessed peak is how other tools end up reporting 104 % MFU.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PEAK_TABLE", "PeakFlops", "flops_per_token", "mfu", "peak_flops"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# FLOPs per token
# ---------------------------------------------------------------------------------------------


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix multiplies: every >= 2-D parameter except the tables
    of ``nn.Embedding`` modules (a lookup, no arithmetic). A tied output projection (an
    ``nn.Linear`` sharing the embedding's weight) is counted once, through the Linear.
    This is Kaplan et al.'s non-embedding N plus the unembedding, which does cost FLOPs."""
    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
    }
    used_by_other: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            continue
        for p in m.parameters(recurse=False):
            used_by_other.add(id(p))
    seen: set[int] = set()
    n = 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        if id(p) in seen or p.dim() < 2:
            continue
        seen.add(id(p))
        if id(p) in embedding_weights and id(p) not in used_by_other:
            continue
        n += p.numel()
    return n


_LAYER_KEYS = ("n_layers", "n_layer", "num_layers", "num_hidden_layers", "n_layers_total")
_WIDTH_KEYS = ("d_model", "n_embd", "hidden_size", "dim", "embed_dim", "d_embed")


def _config_value(model: nn.Module, keys: tuple[str, ...]) -> int | None:
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None), model):
        if holder is None:
            continue
        for key in keys:
            value = holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(n_layers, d_model) read from ``model.config`` / ``model.cfg`` / the model; d_model
    falls back to the first embedding's width, n_layers to the length of the first
    ``nn.ModuleList``. None when not found."""
    n_layers = _config_value(model, _LAYER_KEYS)
    d_model = _config_value(model, _WIDTH_KEYS)
    if d_model is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        d_model = emb.embedding_dim if emb is not None else None
    if n_layers is None:
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList)), None)
        n_layers = len(blocks) if blocks is not None and len(blocks) > 0 else None
    return n_layers, d_model


def formula_flops_per_token(
    model: nn.Module, seq_len: int, *, n_layers: int | None = None, d_model: int | None = None
) -> float:
    """Training FLOPs per token by formula: ``6 N + 12 L d T``.

    ``N`` = :func:`matmul_params`; ``6 N`` = 2 FLOPs per multiply-add for the forward pass
    and twice that for the backward (Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models", sec. 2.1, table 1). ``12 L d T`` is attention's score and value products,
    ``Q K^T`` and ``P V``, for ``L`` layers of width ``d`` over ``T = seq_len`` keys:
    2·2·d·T per token and layer forward, times 3 for forward + backward (Chowdhery et al.
    2022, "PaLM", appendix B, where it is ``12 L H Q T`` with ``H Q = d``). As in PaLM, the
    causal mask is not discounted: it is the convention MFU numbers are quoted in, and the
    same count ``FlopCounterMode`` reports for attention.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len!r}")
    found_layers, found_width = model_shape(model)
    n_layers = n_layers if n_layers is not None else found_layers
    d_model = d_model if d_model is not None else found_width
    flops = 6.0 * matmul_params(model)
    if n_layers is None or d_model is None:
        logger.warning(
            "tdiag: could not find the number of layers / model width (config n_layers, "
            "d_model …); FLOPs per token leave out attention's 12·L·d·T term."
        )
    else:
        flops += 12.0 * n_layers * d_model * seq_len
    return flops


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for fused attention that count model FLOPs, as MFU requires.

    ``FlopCounterMode`` does not know the CPU SDPA kernels (attention would count 0 FLOPs on
    CPU), and for the CUDA kernels' backward it includes the recomputation of the ``Q K^T``
    scores that flash attention does (5 products instead of 4: hardware FLOPs). MFU counts
    the model's own arithmetic without recomputation (PaLM appendix B), so every SDPA
    backward counts twice its forward: the 4 products of the gradients of ``Q K^T`` and ``P V``.
    """
    try:
        from torch.utils.flop_counter import sdpa_flop_count

        aten = torch.ops.aten
        forward_ops = [aten._scaled_dot_product_flash_attention_for_cpu]
        backward_ops = [
            aten._scaled_dot_product_flash_attention_for_cpu_backward,
            aten._scaled_dot_product_flash_attention_backward,
            aten._scaled_dot_product_efficient_attention_backward,
            aten._scaled_dot_product_cudnn_attention_backward,
        ]
    except (ImportError, AttributeError, RuntimeError):  # another torch version: count as is
        return {}

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
        return sdpa_flop_count(q, k, v)  # (B, H, T, D/H) shapes

    def backward(
        grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any
    ) -> int:
        return 2 * sdpa_flop_count(q, k, v)

    return {**dict.fromkeys(forward_ops, forward), **dict.fromkeys(backward_ops, backward)}


def counted_flops_per_token(
    model: nn.Module, seq_len: int, *, vocab_size: int | None = None
) -> float:
    """Training FLOPs per token counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
    forward + backward of a ``(1, seq_len)`` batch of random token ids.

    Attention counts model FLOPs (no recomputation; see :func:`_attention_formulas`), so this
    matches the formula's convention. The model is left as it was: gradients are taken with ``torch.autograd.grad`` (no
    ``.grad`` is touched), the RNG state is restored (dropout draws do not shift training's
    random stream), the training mode is unchanged. Under ``torch.distributed`` every rank
    must call it (a sharded model's forward is collective), or use the formula.

    Raises:
        TypeError / RuntimeError: the model does not run on a batch of token ids.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    if vocab_size is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None:
            raise TypeError("the model has no nn.Embedding: cannot draw token ids to count FLOPs")
        vocab_size = emb.num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, seq_len), generator=gen).to(device)
    devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter,
    ):
        out = _logits(model(ids))
        loss = out.float().mean()
        if params:
            torch.autograd.grad(loss, params, allow_unused=True)
    return counter.get_total_flops() / seq_len


def flops_per_token(
    model: nn.Module,
    seq_len: int,
    *,
    method: str = "auto",
    n_layers: int | None = None,
    d_model: int | None = None,
) -> float:
    """Training (forward + backward) FLOPs per token of ``model`` at sequence length ``seq_len``.

    Args:
        model: the model (not wrapped in DDP is best; wrappers work with "formula").
        seq_len: tokens per sequence (the attention term grows with it).
        method: "formula" (:func:`formula_flops_per_token`, 6N + 12·L·d·T), "counter"
            (:func:`counted_flops_per_token`, FlopCounterMode on one step), or "auto": the
            counter when the model runs on a batch of ids and no process group is active,
            else the formula.
        n_layers, d_model: override what the formula reads from the model's config.

    Returns:
        FLOPs per token (float).

    Raises:
        ValueError: unknown ``method`` or ``seq_len <= 0``.
    """
    if method not in ("auto", "formula", "counter"):
        raise ValueError(f"method must be 'auto', 'formula' or 'counter', got {method!r}")
    if method == "formula":
        return formula_flops_per_token(model, seq_len, n_layers=n_layers, d_model=d_model)
    if method == "counter":
        return counted_flops_per_token(model, seq_len)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        try:
            return counted_flops_per_token(model, seq_len)
        # AssertionError: torch's own FLOP formulas assert on shapes they do not handle.
        except (TypeError, RuntimeError, ValueError, IndexError, AssertionError) as exc:
            logger.info("tdiag: FLOP counting failed (%s); using the 6N + 12·L·d·T formula.", exc)
    return formula_flops_per_token(model, seq_len, n_layers=n_layers, d_model=d_model)


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakFlops:
    """A device's peak FLOP/s for one dtype.

    Attributes:
        value: FLOP/s, or None when unknown (then MFU is not reported).
        source: where the value comes from ("table: …", "measured: …", "user").
        reason: why ``value`` is None ("" when it is known).
    """

    value: float | None
    source: str = ""
    reason: str = ""


T = 1e12
# Dense peak FLOP/s per device as torch sees it, by dtype. Sources: vendor datasheets and
# architecture whitepapers; the "with sparsity" numbers there are halved to dense. "tf32" is
# what fp32 matmuls run at when torch allows TF32 (torch.set_float32_matmul_precision("high")).
# Each entry: (regex on the upper-cased device name, label, {dtype: FLOP/s}, source).
PEAK_TABLE: list[tuple[str, str, dict[str, float], str]] = [
    # NVIDIA H200 datasheet (2024): SXM FP32 67 TF, TF32 989 TF*, BF16/FP16 1979 TF* (*sparse).
    (r"H200.*NVL", "H200 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H200 NVL datasheet"),
    (r"H200", "H200 SXM", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H200 datasheet"),
    # NVIDIA H100 datasheet: NVL FP32 60, TF32 835*, BF16 1671*; PCIe FP32 51, TF32 756*,
    # BF16 1513*; SXM FP32 67, TF32 989*, BF16 1979* (dense = sparse / 2; SXM per the
    # Hopper whitepaper: 494.7 / 989.4).
    (r"H100.*NVL", "H100 NVL", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T},
     "NVIDIA H100 datasheet"),
    (r"H100.*PCI", "H100 PCIe", {"fp32": 51 * T, "tf32": 378 * T, "bf16": 756.5 * T, "fp16": 756.5 * T},
     "NVIDIA H100 datasheet"),
    (r"H100", "H100 SXM", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
     "NVIDIA H100 datasheet / Hopper whitepaper"),
    # NVIDIA A100 datasheet (SXM and PCIe, 40/80 GB): FP32 19.5, TF32 156, BF16/FP16 312.
    (r"A100", "A100", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
     "NVIDIA A100 datasheet"),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5, BF16/FP16 125 (A10G is a different part).
    (r"\bA10\b", "A10", {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T},
     "NVIDIA A10 datasheet"),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 60, BF16/FP16 121 (L40/L40S are other parts).
    (r"\bL4\b", "L4", {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T},
     "NVIDIA L4 datasheet"),
    # NVIDIA V100 datasheet: SXM2 FP32 15.7 / tensor FP16 125; PCIe 14 / 112; V100S 16.4 / 130.
    # Volta has no bf16 or tf32 tensor cores.
    (r"V100S", "V100S PCIe", {"fp32": 16.4 * T, "fp16": 130 * T}, "NVIDIA V100S datasheet"),
    (r"V100.*PCI", "V100 PCIe", {"fp32": 14 * T, "fp16": 112 * T}, "NVIDIA V100 datasheet"),
    (r"V100", "V100 SXM2", {"fp32": 15.7 * T, "fp16": 125 * T}, "NVIDIA V100 datasheet"),
    # NVIDIA T4 datasheet: FP32 8.1, FP16 tensor 65 (Turing: no bf16/tf32).
    (r"\bT4\b", "T4", {"fp32": 8.1 * T, "fp16": 65 * T}, "NVIDIA T4 datasheet"),
    # NVIDIA Ada whitepaper, RTX 4090: FP32 82.6; TF32 82.6; FP16/BF16 tensor with FP32
    # accumulate (what torch uses) 165.2.
    (r"RTX 4090", "RTX 4090", {"fp32": 82.6 * T, "tf32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T},
     "NVIDIA Ada Lovelace architecture whitepaper"),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: FP32 35.6; TF32 35.6; FP16/BF16 tensor with
    # FP32 accumulate 71.
    (r"RTX 3090(?! TI)", "RTX 3090", {"fp32": 35.6 * T, "tf32": 35.6 * T, "bf16": 71 * T, "fp16": 71 * T},
     "NVIDIA Ampere GA102 whitepaper"),
    # AMD Instinct MI300X datasheet: FP32 matrix 163.4, TF32 653.7, BF16/FP16 1307.4 (dense).
    (r"MI300X", "MI300X", {"fp32": 163.4 * T, "tf32": 653.7 * T, "bf16": 1307.4 * T, "fp16": 1307.4 * T},
     "AMD Instinct MI300X datasheet"),
    # AMD Instinct MI250X datasheet: FP32 matrix 95.7, BF16/FP16 383 per module; torch sees
    # each of its two GCDs as a device, so half of that per device.
    (r"MI250X", "MI250X (one GCD)", {"fp32": 47.85 * T, "bf16": 191.5 * T, "fp16": 191.5 * T},
     "AMD Instinct MI250X datasheet (per GCD)"),
]  # fmt: skip

_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def _dtype_key(dtype: Any, device_type: str) -> str:
    if isinstance(dtype, str):
        dtype = dtype.removeprefix("torch.")
        key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}.get(
            dtype, dtype
        )
    elif dtype in _DTYPE_NAMES:
        key = _DTYPE_NAMES[dtype]
    else:
        raise ValueError(f"dtype must be float32, bfloat16, float16 or 'tf32', got {dtype!r}")
    if key not in ("fp32", "tf32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, tf32, bf16 or fp16, got {dtype!r}")
    if (
        key == "fp32"
        and device_type == "cuda"
        and torch.get_float32_matmul_precision() != "highest"
    ):
        key = "tf32"  # fp32 matmuls run on TF32 tensor cores: that is their peak
    return key


def lookup_peak(device_name: str, dtype_key: str) -> PeakFlops:
    """Look ``device_name`` up in :data:`PEAK_TABLE` (no measuring, no guessing)."""
    name = device_name.upper()
    for pattern, label, peaks, source in PEAK_TABLE:
        if re.search(pattern, name):
            if dtype_key not in peaks:
                return PeakFlops(
                    None,
                    f"table: {label}",
                    f"{label} has no {dtype_key} peak in the table (no such tensor cores); "
                    "pass peak_flops= to Monitor",
                )
            return PeakFlops(peaks[dtype_key], f"table: {label} {dtype_key} dense, {source}", "")
    return PeakFlops(
        None,
        "",
        f"GPU {device_name!r} not in the peak table; pass peak_flops= to Monitor",
    )


_MEASURED: dict[tuple[str, int], PeakFlops] = {}  # per-process cache: (dtype, threads) -> peak


def measure_cpu_peak(
    dtype_key: str = "fp32", *, size: int = 1024, seconds: float = 0.3
) -> PeakFlops:
    """Measure a CPU matmul peak: best FLOP/s of ``size``x``size`` matmuls over ~``seconds``.

    The best of several timed repeats, with torch's current thread count; cached per process
    and thread count. The training step does other work than large matmuls, so MFU against
    this peak is an upper-bound-style "how close to the matmul roofline", well under 1.
    """
    threads = torch.get_num_threads()
    key = (dtype_key, threads)
    if key in _MEASURED:
        return _MEASURED[key]
    dtype = {
        "fp32": torch.float32,
        "tf32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }[dtype_key]
    gen = torch.Generator().manual_seed(0)
    # A dtype without native CPU kernels (fp16 on most CPUs) runs a 1024³ matmul in seconds:
    # time a small one first and shrink the size so the whole measurement stays ~``seconds``
    # (it runs inside the user's first log step).
    small = min(size, 256)
    probe = torch.randn(small, small, generator=gen).to(dtype)
    t0 = time.perf_counter()
    torch.mm(probe, probe)
    torch.mm(probe, probe)
    t_small = (time.perf_counter() - t0) / 2
    while size > small and t_small * (size / small) ** 3 > seconds / 2:
        size //= 2
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    flop = 2.0 * size**3
    torch.mm(a, b)  # warm-up (allocations, kernel selection)
    best = 0.0
    deadline = time.perf_counter() + seconds
    repeats = 0
    while repeats < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, flop / dt)
        repeats += 1
        if repeats >= 200:
            break
    peak = PeakFlops(
        best,
        f"measured: {dtype_key} {size}x{size} matmul, best of {repeats}, {threads} thread(s)",
        "",
    )
    _MEASURED[key] = peak
    return peak


def peak_flops(device: Any, dtype: Any = torch.float32) -> PeakFlops:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``.

    CUDA/ROCm devices: looked up by name in :data:`PEAK_TABLE`; fp32 counts as tf32 when
    ``torch.get_float32_matmul_precision()`` allows TF32. CPU: measured (see
    :func:`measure_cpu_peak`). Anything else, or an unlisted GPU: ``value=None`` and a reason.

    Args:
        device: ``torch.device`` or string ("cpu", "cuda:0").
        dtype: ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` or "tf32".

    Raises:
        ValueError: an unsupported dtype.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    key = _dtype_key(dtype, dev.type)
    if dev.type == "cpu":
        return measure_cpu_peak("fp32" if key == "tf32" else key)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return PeakFlops(None, "", f"device {dev} requested but CUDA is not available")
        name = torch.cuda.get_device_name(dev)
        return lookup_peak(name, key)
    return PeakFlops(
        None, "", f"no peak FLOP/s known for device type {dev.type!r}; pass peak_flops= to Monitor"
    )


def mfu(
    tokens_per_sec: float | None,
    flops_per_token: float | None,
    peak: PeakFlops | float | None,
) -> float | None:
    """Model FLOPs utilisation: ``tokens_per_sec * flops_per_token / peak`` (a fraction, 0–1).

    None when any input is missing, non-finite or the peak is not positive.
    """
    peak_value = peak.value if isinstance(peak, PeakFlops) else peak
    values = (tokens_per_sec, flops_per_token, peak_value)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    assert tokens_per_sec is not None and flops_per_token is not None and peak_value is not None
    if peak_value <= 0:
        return None
    return tokens_per_sec * flops_per_token / peak_value
