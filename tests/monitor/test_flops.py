"""FLOPs per token (formula vs FlopCounterMode), the peak table, CPU peak, MFU."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdiag.monitor import flops
from tdiag.monitor.flops import (
    PeakFlops,
    counted_flops_per_token,
    flops_per_token,
    formula_flops_per_token,
    lookup_peak,
    matmul_params,
    mfu,
    peak_flops,
)

VOCAB, D, HEADS, LAYERS, MAX_LEN = 97, 32, 4, 2, 64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)
        q, k, v = (
            z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v)
        )  # (B,H,T,D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, D)))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, *, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(MAX_LEN, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))  # (B, T, V)


def _manual_matmul_params(tied: bool) -> int:
    per_block = D * 3 * D + D * D + D * 4 * D + 4 * D * D  # qkv, proj, fc, out weights
    return LAYERS * per_block + VOCAB * D  # + the output projection (tied or not: once)


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_counts_weights_not_embedding_tables(tied):
    model = TinyGPT(tied=tied)
    assert matmul_params(model) == _manual_matmul_params(tied)


@pytest.mark.parametrize("seq_len", [16, 32])
def test_formula_is_6n_plus_attention(seq_len):
    model = TinyGPT()
    expected = 6 * _manual_matmul_params(True) + 12 * LAYERS * D * seq_len
    # The tiny model has no config: n_layers comes from its ModuleList, d_model from the embedding.
    assert formula_flops_per_token(model, seq_len) == expected
    assert flops_per_token(model, seq_len, method="formula") == expected
    assert formula_flops_per_token(model, seq_len, n_layers=1, d_model=8) == (
        6 * _manual_matmul_params(True) + 12 * 8 * seq_len
    )


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("seq_len", [16, 64])
def test_formula_agrees_with_flop_counter(tied, seq_len):
    model = TinyGPT(tied=tied)
    counted = flops_per_token(model, seq_len, method="counter")
    formula = flops_per_token(model, seq_len, method="formula")
    # Within 5 %: the formula leaves out the embedding's backward and small extras.
    assert counted == pytest.approx(formula, rel=0.05)


def test_counter_sees_attention_on_cpu():
    model = TinyGPT()
    short, long = (counted_flops_per_token(model, t) for t in (16, 64))
    # The attention term grows by 12·L·d per extra key (PaLM appendix B).
    assert long - short == pytest.approx(12 * LAYERS * D * (64 - 16), rel=0.01)


def test_counter_leaves_the_model_and_rng_untouched():
    model = TinyGPT()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    counted_flops_per_token(model, 16)
    assert torch.equal(torch.rand(3), expected_next)  # dropout draws were rolled back
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_uses_the_counter_and_falls_back_to_the_formula():
    model = TinyGPT()
    assert flops_per_token(model, 32) == counted_flops_per_token(model, 32)

    class NeedsFloats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.config = {"n_layers": 1, "d_model": D}

        def forward(self, x):
            return self.fc(x)  # a LongTensor of ids cannot go through a Linear

    odd = NeedsFloats()
    assert flops_per_token(odd, 8) == 6 * D * D + 12 * 1 * D * 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        flops_per_token(TinyGPT(), 8, method="guess")
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(TinyGPT(), 0, method="formula")


# ---- peak table ------------------------------------------------------------------------------

T = 1e12


@pytest.mark.parametrize(
    ("name", "dtype", "value"),
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312 * T),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5 * T),
        ("NVIDIA A100-PCIE-40GB", "tf32", 156 * T),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4 * T),
        ("NVIDIA H100 PCIe", "bf16", 756.5 * T),
        ("NVIDIA H100 NVL", "fp16", 835.5 * T),
        ("NVIDIA H200", "bf16", 989.4 * T),
        ("NVIDIA H200 NVL", "bf16", 835.5 * T),
        ("NVIDIA L4", "bf16", 121 * T),
        ("NVIDIA A10", "fp16", 125 * T),
        ("Tesla V100-SXM2-16GB", "fp16", 125 * T),
        ("Tesla V100-PCIE-32GB", "fp32", 14 * T),
        ("Tesla T4", "fp16", 65 * T),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2 * T),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6 * T),
        ("AMD Instinct MI300X", "bf16", 1307.4 * T),
        ("AMD Instinct MI250X", "bf16", 191.5 * T),
    ],
)
def test_peak_table_lookup(name, dtype, value):
    peak = lookup_peak(name, dtype)
    assert peak.value == value
    assert peak.source.startswith("table: ") and "dense" in peak.source and peak.reason == ""


@pytest.mark.parametrize(
    "name",
    ["NVIDIA A10G", "NVIDIA L40S", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA B200", "Some New GPU"],
)
def test_unknown_gpu_has_no_peak_and_says_why(name):
    peak = lookup_peak(name, "bf16")
    assert peak.value is None
    assert peak.reason == f"GPU {name!r} not in the peak table; pass peak_flops= to Monitor"


def test_dtype_without_tensor_cores_has_no_peak():
    peak = lookup_peak("Tesla V100-SXM2-16GB", "bf16")
    assert peak.value is None and "no bf16 peak" in peak.reason


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


def test_peak_flops_on_a_cuda_device_by_dtype(fake_gpu):
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("cuda", torch.float32).value == 67 * T
        assert peak_flops("cuda:0", torch.bfloat16).value == 989.4 * T
        assert peak_flops(torch.device("cuda"), "fp16").value == 989.4 * T
        assert peak_flops("cuda", "torch.bfloat16").value == 989.4 * T
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        peak = peak_flops("cuda", torch.float32)
        assert peak.value == 494.7 * T and "tf32" in peak.source
    finally:
        torch.set_float32_matmul_precision(precision)


def test_peak_flops_cuda_unavailable_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops("cuda").value is None
    other = peak_flops("meta")
    assert other.value is None and "pass peak_flops=" in other.reason
    with pytest.raises(ValueError, match="int8"):
        peak_flops("cpu", torch.int8)


def test_cpu_peak_is_measured_and_cached(monkeypatch):
    monkeypatch.setattr(flops, "_MEASURED", {})
    first = peak_flops("cpu")
    assert first.value is not None and first.value > 1e8
    assert first.source.startswith("measured: fp32")
    t0 = time.perf_counter()
    assert peak_flops("cpu", torch.float32) is first  # cached per process and thread count
    assert time.perf_counter() - t0 < 0.05


# ---- MFU -------------------------------------------------------------------------------------


def test_mfu_arithmetic_and_missing_inputs():
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, PeakFlops(2e12, "user")) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, PeakFlops(None, "", "unknown GPU")) is None
    assert mfu(None, 1e9, 1e12) is None
    assert mfu(math.nan, 1e9, 1e12) is None
    assert mfu(1.0, 1e9, 0.0) is None


def test_mfu_of_a_cpu_training_run_is_at_most_one(monkeypatch):
    monkeypatch.setattr(flops, "_MEASURED", {})
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, seq_len = 8, 32
    fpt = flops_per_token(model, seq_len)
    peak = peak_flops("cpu", torch.float32)
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1))
    t0 = time.perf_counter()
    steps = 5
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    tokens_per_sec = steps * batch * seq_len / (time.perf_counter() - t0)
    value = mfu(tokens_per_sec, fpt, peak)
    assert value is not None and 0.0 < value <= 1.0


@pytest.mark.hf
def test_formula_matches_the_counter_on_a_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=101,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)  # Conv1D weights, tied lm_head, output.logits
    for seq_len in (16, 64):
        counted = flops_per_token(model, seq_len, method="counter")
        assert counted == pytest.approx(flops_per_token(model, seq_len, method="formula"), rel=0.02)


def test_cpu_peak_of_a_slow_dtype_stays_within_its_time_budget(monkeypatch):
    # fp16 matmuls have no native kernels on most CPUs (a 1024³ one takes seconds): the
    # measurement runs inside the user's first log step, so it must shrink, not stall.
    import time

    from tdiag.monitor import flops

    monkeypatch.setattr(flops, "_MEASURED", {})
    t0 = time.perf_counter()
    peak = flops.measure_cpu_peak("fp16", seconds=0.3)
    assert time.perf_counter() - t0 < 2.5  # unbounded: ~4 matmuls of ~1 s each here
    assert peak.value is not None and peak.value > 0
