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
    import tdiag.hooks as hooks

    def broken(t):
        raise RuntimeError("cannot reduce this tensor")

    monkeypatch.setattr(hooks, "tensor_stats", broken)
    x = torch.randint(0, 64, (2, 16))
    with ActivationRecorder(tiny_gpt) as act, GradientRecorder(tiny_gpt) as grad:
        tiny_gpt(x).sum().backward()  # must not raise
    assert act.records == [] and act.errors > 0
    assert grad.records == [] and grad.errors > 0
