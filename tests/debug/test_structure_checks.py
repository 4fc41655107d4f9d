"""Structure checks (causal.leak, batch.mixing, padding.leak, position.missing,
kvcache.mismatch): each on a model file with the fault and one without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdiag.debug.probes import region_values
from tdiag.debug.runner import CheckResult, run_checks
from tdiag.findings import Severity
from tdiag.loading import load_target

MODELS = Path(__file__).parent / "models"


def run_one(name: str, check_id: str) -> CheckResult:
    ctx = load_target(str(MODELS / f"{name}.py"))
    (result,) = run_checks(ctx, only=check_id).results
    assert result.status != "error", result.message
    return result


def test_causal_leak_without_mask_names_the_attention() -> None:
    (f,) = run_one("b2_causal_none", "causal.leak").findings
    assert f.severity is Severity.ERROR
    assert f.where == "blocks.0.attn"
    assert f.evidence["leaking_positions"][0] == 0  # every past position sees the future


def test_causal_leak_shifted_mask_is_local() -> None:
    (f,) = run_one("b2_causal_shifted", "causal.leak").findings
    p = f.evidence["boundary"]
    leaking = f.evidence["leaking_positions"]
    assert p - 1 in leaking  # the position just before the boundary sees the next token
    assert 0 not in leaking  # but only one position ahead per layer
    assert f.where == "blocks.0.attn"


@pytest.mark.parametrize("clean", ["b2_gpt", "b2_nanogpt", "b2_llama"])
def test_causal_models_without_leak(clean: str) -> None:
    r = run_one(clean, "causal.leak")
    assert r.status == "pass" and r.findings == []


def test_causal_leak_skipped_for_encoder() -> None:
    r = run_one("b2_encoder", "causal.leak")
    assert r.status == "skipped" and "bidirectional" in r.message


def test_batchnorm_mixes_samples_and_state_is_restored() -> None:
    ctx = load_target(str(MODELS / "b2_batchnorm.py"))
    bn = ctx.model.blocks[0].ln1
    mean = bn.running_mean.clone()
    (r,) = run_checks(ctx, only="batch.mixing").results
    (f,) = r.findings
    assert f.severity is Severity.ERROR
    assert f.where == "blocks.0.ln1"
    assert torch.equal(bn.running_mean, mean)  # train-mode forwards did not touch the stats


@pytest.mark.parametrize("clean", ["b2_gpt", "b2_torch_encoder"])
def test_no_batch_mixing(clean: str) -> None:
    # b2_torch_encoder has dropout 0.1: the check must compare with the same dropout masks
    assert run_one(clean, "batch.mixing").findings == []


def test_padding_leak_when_attention_ignores_the_mask() -> None:
    (f,) = run_one("b2_ignores_mask", "padding.leak").findings
    assert f.severity is Severity.ERROR
    assert f.where == "blocks.0.attn"
    assert f.evidence["padding"] == "left"  # a causal model: pads before the real tokens
    assert "mask" in f.recommendation


@pytest.mark.parametrize("clean", ["b2_gpt", "b2_encoder", "b2_torch_encoder"])
def test_no_padding_leak(clean: str) -> None:
    r = run_one(clean, "padding.leak")
    assert r.status == "pass" and r.findings == []


def test_padding_leak_skipped_without_mask_or_pad_id() -> None:
    r = run_one("b2_mlp_stack", "padding.leak")
    assert r.status == "skipped"


def test_position_missing_in_encoder_without_positions() -> None:
    (f,) = run_one("b2_encoder_nopos", "position.missing").findings
    assert f.severity is Severity.ERROR
    assert f.evidence["relative_change"] < 1e-4
    assert f.where == "embed"  # where positions would be added


@pytest.mark.parametrize("clean", ["b2_encoder", "b2_torch_encoder"])
def test_position_present(clean: str) -> None:
    assert run_one(clean, "position.missing").status == "pass"


def test_position_missing_skipped_for_causal() -> None:
    assert run_one("b2_gpt", "position.missing").status == "skipped"


def test_kvcache_mismatch() -> None:
    (f,) = run_one("b2_kvcache_broken", "kvcache.mismatch").findings
    assert f.severity is Severity.ERROR
    assert f.evidence["first_bad_position"] == 1  # position 0 is right even without offsets


def test_kvcache_ok_and_skipped() -> None:
    assert run_one("b2_gpt", "kvcache.mismatch").status == "pass"
    assert run_one("b2_mlp_stack", "kvcache.mismatch").status == "skipped"


def test_kvcache_of_the_reference_model() -> None:
    ref = Path(__file__).parents[2] / "reference_model" / "model.py"
    (r,) = run_checks(load_target(str(ref)), only="kvcache.mismatch").results
    assert r.status == "pass", (r.message, r.findings)


def test_region_values_layouts() -> None:
    B, L, H, D = 2, 5, 3, 4
    region = torch.zeros(B, L, dtype=torch.bool)
    region[1, :2] = True
    x = torch.randn(B, L, D)
    assert torch.equal(region_values(x, region), x[1, :2])
    assert torch.equal(region_values(x.transpose(0, 1), region), x[1, :2])  # (L, B, D)
    y = torch.randn(B, H, L, D)
    assert torch.equal(region_values(y, region), y[1, :, :2].transpose(0, 1))
    assert torch.equal(region_values(x.reshape(B * L, D), region), x[1, :2])
    assert region_values(torch.randn(L, D), region) is None


class SeqFirstNoMask(torch.nn.Module):
    """Embeds ``input_ids.T`` (sequence-first, as old PyTorch code does) and has no causal
    mask: the embedding hook cannot apply, so the check perturbs token ids instead."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.embed = torch.nn.Embedding(64, 32)
        self.attn = torch.nn.MultiheadAttention(32, 2)  # sequence-first
        self.head = torch.nn.Linear(32, 64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids.t())  # (L, B, D)
        L = x.shape[0]
        mask = torch.ones(L, L, dtype=torch.bool).triu(1) if self.causal else None
        y, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False)
        return self.head(x + y).transpose(0, 1)  # (B, L, V)


@pytest.mark.parametrize("causal", [False, True])
def test_token_id_fallback_when_embedding_is_sequence_first(make_ctx, causal: bool) -> None:
    from tdiag.debug.structure import check_causal_leak

    findings = check_causal_leak(make_ctx(SeqFirstNoMask(causal)))
    if causal:
        assert findings == []
    else:
        (f,) = findings
        assert f.where == "attn"
