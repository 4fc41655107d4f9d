"""The hooks layer: records in execution order, one host sync, clean detach, attention capture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdiag.hooks import ActivationRecorder, AttentionCapture, GradientRecorder, first_float_tensor
from tdiag.stats import tensor_stats


def model_fingerprint(model: nn.Module) -> dict:
    """Everything detaching must leave unchanged."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "param_hooks": [len(p._backward_hooks or {}) for p in model.parameters()],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["hooks"] == b["hooks"]
    assert a["param_hooks"] == b["param_hooks"]
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)


def test_activation_records_in_execution_order(tiny_gpt: nn.Module) -> None:
    x = torch.randint(0, 64, (2, 16))
    with ActivationRecorder(tiny_gpt, inputs=True) as rec:
        logits = tiny_gpt(x)
    names = [r.name for r in rec.records]
    # children complete before their parent, blocks in depth order, lm_head last
    assert names.index("blocks.0.qkv") < names.index("blocks.0") < names.index("blocks.1")
    assert names[-1] == "lm_head"
    assert names.index("embed") == 0
    rows = rec.to_host()
    assert [r["order"] for r in rows] == list(range(len(rows)))
    head = rows[-1]
    assert head["out"]["abs_max"] == pytest.approx(logits.abs().max().item(), rel=1e-5)
    assert head["out"]["rms"] == pytest.approx(logits.pow(2).mean().sqrt().item(), rel=1e-4)
    assert head["in"] is not None and head["in"]["finite"] == 1.0
    assert rows[0]["in"] is None  # the embedding's input is integer ids


def test_to_host_is_one_sync(tiny_gpt: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    with ActivationRecorder(tiny_gpt, inputs=True) as rec:
        tiny_gpt(torch.randint(0, 64, (2, 16)))
    calls = []
    orig = torch.Tensor.tolist

    def counting(self: torch.Tensor):
        calls.append(self.shape)
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    rows = rec.to_host()
    assert len(calls) == 1 and len(rows) == len(rec.records) > 10


def test_detach_leaves_model_exactly_as_before(tiny_gpt: nn.Module) -> None:
    tiny_gpt.blocks[0].fc.weight.requires_grad_(False)
    tiny_gpt.blocks[1].train()
    before = model_fingerprint(tiny_gpt)
    act = ActivationRecorder(tiny_gpt, inputs=True).attach()
    grad = GradientRecorder(tiny_gpt).attach()
    with AttentionCapture(model=tiny_gpt, keep_probs=True):
        tiny_gpt(torch.randint(0, 64, (2, 16))).sum().backward()
    assert act.records and grad.records
    assert model_fingerprint(tiny_gpt)["hooks"] != before["hooks"]  # they were attached
    act.detach()
    grad.detach()
    act.detach()  # idempotent
    assert_same(model_fingerprint(tiny_gpt), before)


def test_disabled_recorder_records_nothing(tiny_gpt: nn.Module) -> None:
    with ActivationRecorder(tiny_gpt) as rec:
        rec.enabled = False
        tiny_gpt(torch.randint(0, 64, (2, 16)))
        assert rec.records == []
        rec.enabled = True
        tiny_gpt(torch.randint(0, 64, (2, 16)))
        assert rec.records


def test_gradient_recorder_stats_and_order(tiny_gpt: nn.Module) -> None:
    x = torch.randint(0, 64, (2, 16))
    with GradientRecorder(tiny_gpt) as rec:
        tiny_gpt(x).pow(2).mean().backward()
    by_name = {r.name: r for r in rec.param_records}
    w = tiny_gpt.blocks[0].fc.weight
    assert torch.allclose(by_name["blocks.0.fc.weight"].stats, tensor_stats(w.grad))
    mods = [r.name for r in rec.module_records]
    # backward visits the last layer first
    assert mods.index("lm_head") < mods.index("blocks.1") < mods.index("blocks.0")
    rows = rec.to_host()
    assert {r["kind"] for r in rows} == {"module", "param"}
    assert [r["order"] for r in rows] == list(range(len(rows)))


def test_gradient_recorder_tolerates_inplace_after_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    with GradientRecorder(model) as rec:
        model(torch.randn(3, 4)).sum().backward()
    assert any(r.name == "0" for r in rec.module_records)


def test_gradient_recorder_sees_nan_grad() -> None:
    class SqrtAtZero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(x - x)  # d/dx sqrt(0) = inf, times 0 -> nan

    model = nn.Sequential(nn.Linear(4, 4), SqrtAtZero(), nn.Linear(4, 1))
    with GradientRecorder(model) as rec:
        model(torch.randn(3, 4)).sum().backward()
    rows = rec.to_host()
    first_bad = next(r for r in rows if r["stats"]["finite"] == 0.0)
    assert first_bad["name"] in ("0", "0.weight", "0.bias")
    assert all(r["stats"]["finite"] == 1.0 for r in rows if r["name"].startswith("2"))


def _reference_probs(q, k, causal):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_capture_sdpa(causal: bool) -> None:
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    with AttentionCapture(keep_probs=True) as cap:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = _reference_probs(q, k, causal)
    assert torch.allclose(out, ref @ v, atol=1e-5)  # the model's result is untouched
    (call,) = cap.calls
    assert call.kind == "sdpa" and torch.allclose(call.probs, ref, atol=1e-5)
    ent = -(ref * ref.clamp_min(1e-30).log()).sum(-1).mean()
    assert call.entropy.item() == pytest.approx(ent.item(), rel=1e-4)
    raw = q @ k.transpose(-2, -1) / math.sqrt(8)
    assert call.max_logit.item() == pytest.approx(raw.max().item(), rel=1e-5)


def test_attention_capture_softmax_and_module_name(tiny_gpt: nn.Module) -> None:
    class Eager(nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return F.softmax(s, dim=-1) + s.softmax(-1) + torch.softmax(s, dim=1)

    m = nn.Sequential(Eager())
    with AttentionCapture(model=m) as cap:
        m(torch.randn(2, 4, 4))
        F.softmax(torch.randn(4, 4), dim=-1)  # 2-D: not attention
    assert [c.kind for c in cap.calls] == ["softmax", "softmax"]  # dim=1 and 2-D skipped
    assert {c.module_name for c in cap.calls} == {"0"}
    assert all(c.probs is None for c in cap.calls)
    with AttentionCapture(model=tiny_gpt) as cap:
        tiny_gpt(torch.randint(0, 64, (2, 16)))
    assert [c.module_name for c in cap.calls] == ["blocks.0", "blocks.1"]
    uniform = math.log(16)
    assert all(0 < c.entropy.item() <= uniform for c in cap.calls)
    assert tiny_gpt.blocks[0]._forward_pre_hooks == {}


def test_attention_capture_multihead_attention() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    plain_out, plain_w = mha(x, x, x)
    with AttentionCapture(keep_probs=True) as cap:
        out, w = mha(x, x, x)
        out2, w2 = mha(x, x, x, need_weights=False)
    assert torch.allclose(out, plain_out, atol=1e-5) and torch.allclose(w, plain_w, atol=1e-6)
    assert w2 is None and torch.allclose(out2, plain_out, atol=1e-5)
    assert [c.kind for c in cap.calls] == ["mha", "mha"]
    assert cap.calls[0].probs.shape == (2, 4, 5, 5)


def test_first_float_tensor_forms() -> None:
    t = torch.randn(2)
    assert first_float_tensor((torch.tensor(3), t)) is t
    assert first_float_tensor({"loss": None, "logits": t}) is t
    assert first_float_tensor(torch.tensor([1, 2])) is None


def test_hooks_never_raise_in_the_hot_path(tiny_gpt: nn.Module, monkeypatch) -> None:
    import tdiag.hooks.activations
    import tdiag.hooks.gradients

    def broken(t):
        raise RuntimeError("cannot reduce this tensor")

    monkeypatch.setattr(tdiag.hooks.activations, "tensor_stats", broken)
    monkeypatch.setattr(tdiag.hooks.gradients, "tensor_stats", broken)
    x = torch.randint(0, 64, (2, 16))
    with ActivationRecorder(tiny_gpt) as act, GradientRecorder(tiny_gpt) as grad:
        tiny_gpt(x).sum().backward()  # must not raise
    assert act.records == [] and act.errors > 0
    assert grad.records == [] and grad.errors > 0


# -- bounded SDPA recomputation: sampled query rows / batch*head slices, chunked ---------------


def _naive_sdpa_scores(q, k, *, mask=None, causal=None, scale=None, gqa=False):
    """SDPA's reference maths in float64: (raw scaled scores, masked scores), both (..., L, S).

    causal: None, "upper_left" (SDPA's is_causal) or "lower_right".
    """
    q, k = q.double(), k.double()
    if gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    raw = q @ k.transpose(-2, -1) * scale
    L, S = raw.shape[-2:]
    s = raw
    if causal is not None:
        diag = 0 if causal == "upper_left" else S - L
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(diagonal=diag), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return raw, s


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)  # (..., L)


def _padding_mask(B: int, S: int) -> torch.Tensor:
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., S - 5 :] = False  # sequence 0 is padded at the end
    return mask


@pytest.mark.parametrize("variant", ["causal", "padding", "additive", "scale", "gqa"])
def test_sdpa_sampled_rows_match_naive_on_those_rows(variant: str, monkeypatch) -> None:
    import tdiag.hooks.attention as hooks

    monkeypatch.setattr(hooks, "ATTN_SAMPLE_ROWS", 8)
    torch.manual_seed(0)
    B, H, L, E = 2, 4, 64, 8
    q, k, v = (torch.randn(B, H, L, E) * 2 for _ in range(3))
    kw: dict = {}
    ref_kw: dict = {}
    if variant == "causal":
        kw, ref_kw = {"is_causal": True}, {"causal": "upper_left"}
    elif variant == "padding":
        mask = _padding_mask(B, L)
        kw, ref_kw = {"attn_mask": mask}, {"mask": mask}
    elif variant == "additive":
        bias = torch.randn(L, L)
        kw, ref_kw = {"attn_mask": bias}, {"mask": bias}
    elif variant == "scale":
        kw, ref_kw = {"scale": 0.7, "is_causal": True}, {"scale": 0.7, "causal": "upper_left"}
    else:
        k, v = k[:, :2], v[:, :2]
        kw, ref_kw = {"enable_gqa": True}, {"gqa": True}
    with AttentionCapture() as cap:
        F.scaled_dot_product_attention(q, k, v, **kw)
    (call,) = cap.calls
    rows = torch.arange(8) * (L - 1) // 7  # evenly spread, first and last row included
    assert torch.equal(hooks.attention_sample_indices(L, 8), rows)
    assert call.sample == (8, B * H) and call.shape == (B, H, L, L) and call.probs is None
    raw, s = _naive_sdpa_scores(q, k, **ref_kw)
    ent = _entropy_rows(s.softmax(-1))  # (B, H, L)
    expected = ent[..., rows].mean().item()
    assert call.entropy.item() == pytest.approx(expected, rel=1e-5)
    assert call.max_logit.item() == pytest.approx(raw[..., rows, :].max().item(), rel=1e-5)
    if variant == "causal":  # the sample is not the full mean: the test can tell them apart
        assert abs(ent.mean().item() - expected) > 1e-3


def test_sdpa_small_inputs_are_exact_without_keep_probs(monkeypatch) -> None:
    import tdiag.hooks.attention as hooks

    monkeypatch.setattr(hooks, "ATTN_SAMPLE_ROWS", 16)
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    mask = _padding_mask(2, 16)
    with AttentionCapture() as cap:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for call, ref_kw in zip(cap.calls, ({"causal": "upper_left"}, {"mask": mask}), strict=True):
        raw, s = _naive_sdpa_scores(q, k, **ref_kw)
        assert call.sample is None
        assert call.entropy.item() == pytest.approx(_entropy_rows(s.softmax(-1)).mean().item())
        assert call.max_logit.item() == pytest.approx(raw.max().item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["rect-causal", "lower-right", "gqa", "padding", "3d"])
def test_sdpa_kept_probs_reproduce_sdpa_output(variant: str) -> None:
    """The recomputed probabilities follow SDPA's own semantics: probs @ v == its output."""
    from torch.nn.attention.bias import causal_lower_right

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    kw: dict = {}
    if variant == "rect-causal":  # L != S: SDPA's is_causal is top-left aligned
        kw = {"is_causal": True}
    elif variant == "lower-right":
        kw = {"attn_mask": causal_lower_right(5, 9)}
    elif variant == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw = {"enable_gqa": True}
    elif variant == "padding":
        kw = {"attn_mask": _padding_mask(2, 9)}
    else:
        q, k, v = q[0], k[0], v[0]
    with AttentionCapture(keep_probs=True) as cap:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    (call,) = cap.calls
    if variant == "gqa":
        v = v.repeat_interleave(2, dim=-3)
    assert call.sample is None and call.probs.shape == call.shape == (*q.shape[:-1], 9)
    assert torch.allclose(call.probs @ v, out, atol=1e-5)


def test_sdpa_slices_are_sampled_beyond_the_score_budget(monkeypatch) -> None:
    import tdiag.hooks.attention as hooks

    monkeypatch.setattr(hooks, "ATTN_SAMPLE_ROWS", 8)
    monkeypatch.setattr(hooks, "ATTN_SAMPLE_SCORES", 3 * 8 * 32)  # 3 slices of 8 rows x 32 keys
    torch.manual_seed(3)
    B, H, L = 2, 4, 32
    q, k, v = (torch.randn(B, H, L, 8) * 2 for _ in range(3))
    with AttentionCapture() as cap:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (call,) = cap.calls
    slices = hooks.attention_sample_indices(B * H, 3)
    rows = hooks.attention_sample_indices(L, 8)
    assert call.sample == (8, 3) and slices.tolist() == [0, 3, 7]
    raw, s = _naive_sdpa_scores(q, k, causal="upper_left")
    ent = _entropy_rows(s.softmax(-1)).reshape(B * H, L)[slices][:, rows]
    assert call.entropy.item() == pytest.approx(ent.mean().item(), rel=1e-5)
    raw_sel = raw.reshape(B * H, L, L)[slices][:, rows]
    assert call.max_logit.item() == pytest.approx(raw_sel.max().item(), rel=1e-5)


class _LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the largest tensor any torch function returns (the capture's own ops included:
    while a mode handles a call, the calls it makes go to the mode below it)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk_scores", [None, 8 * 64])
def test_sdpa_recomputation_memory_is_rows_times_keys(chunk_scores, monkeypatch) -> None:
    import tdiag.hooks.attention as hooks

    monkeypatch.setattr(hooks, "ATTN_SAMPLE_ROWS", 8)
    if chunk_scores is not None:
        monkeypatch.setattr(hooks, "ATTN_CHUNK_SCORES", chunk_scores)
    B, H, L, E = 2, 2, 64, 2
    q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
    mask = _padding_mask(B, L).expand(B, H, L, L).clone()  # a full (B, H, L, S) boolean mask
    spy = _LargestTensor()
    with spy, AttentionCapture() as cap:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len(cap.calls) == 1 and cap.calls[0].sample == (8, B * H)
    per_chunk = 8 * L * (1 if chunk_scores else B * H)  # scores of the sampled rows
    assert spy.largest <= max(per_chunk, q.numel())  # q.numel(): SDPA's own output
    assert spy.largest < B * H * L * L // 4
    with spy, AttentionCapture(keep_probs=True):  # asking for the probs costs them all
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert spy.largest >= B * H * L * L


def test_softmax_entropy_uses_the_same_row_sample(monkeypatch) -> None:
    import tdiag.hooks.attention as hooks

    monkeypatch.setattr(hooks, "ATTN_SAMPLE_ROWS", 8)
    s = torch.randn(2, 3, 64, 64) * 3
    with AttentionCapture() as cap:
        p = s.softmax(-1)
    (call,) = cap.calls
    rows = hooks.attention_sample_indices(64, 8)
    assert call.sample == (8, 6)
    assert call.entropy.item() == pytest.approx(_entropy_rows(p[..., rows, :]).mean().item())
    assert call.max_logit.item() == s.max().item()
