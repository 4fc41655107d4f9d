"""Initialisation checks: a faulty and a healthy model each."""

from __future__ import annotations

import math

import pytest
import torch
from b1_tiny import TinyGPT
from torch import nn

from tdiag.debug.init import (
    LOGIT_STD_MAX,
    STD_RATIO_HIGH,
    activation_growth,
    logit_scale,
    loss_init_mismatch,
    std_out_of_range,
)
from tdiag.debug.registry import SkipCheck
from tdiag.findings import Severity


def model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(**kw).eval()


def non_info(findings):
    return [f for f in findings if f.severity is not Severity.INFO]


def test_std_out_of_range_high(make_ctx) -> None:
    m = model()
    nn.init.normal_(m.blocks[1].fc.weight, 0.0, 1.0)  # fan_in 32: ratio ~5.7
    (warn,) = non_info(std_out_of_range(make_ctx(m)))
    assert warn.where == "blocks.1.fc.weight"
    assert warn.evidence["params"][0]["ratio"] == pytest.approx(
        m.blocks[1].fc.weight.std(unbiased=False).item() * math.sqrt(32), rel=1e-4
    )
    assert warn.evidence["params"][0]["ratio"] > STD_RATIO_HIGH


def test_std_out_of_range_low_but_zero_is_fine(make_ctx) -> None:
    m = model()
    nn.init.zeros_(m.blocks[0].out.weight)  # deliberate zero-init: not a finding
    assert non_info(std_out_of_range(make_ctx(m))) == []
    nn.init.normal_(m.blocks[0].qkv.weight, 0.0, 1e-5)
    (warn,) = non_info(std_out_of_range(make_ctx(m)))
    assert warn.where == "blocks.0.qkv.weight" and "small" in warn.title


def test_std_table_is_complete_info(make_ctx) -> None:
    m = model()
    findings = std_out_of_range(make_ctx(m))
    (info,) = findings  # healthy: only the table
    assert info.severity is Severity.INFO
    table = {r["name"]: r for r in info.evidence["table"]}
    assert set(table) == {n for n, _ in m.named_parameters()}
    w = m.blocks[0].qkv.weight
    assert table["blocks.0.qkv.weight"]["std"] == pytest.approx(
        w.std(unbiased=False).item(), rel=1e-5
    )
    assert table["blocks.0.qkv.weight"]["fan_in"] == 32
    assert "fan_in" not in table["embed.weight"]  # embeddings are not judged by fan-in


def test_pytorch_default_init_passes(make_ctx) -> None:
    assert non_info(std_out_of_range(make_ctx(model(init_std=None)))) == []


def test_activation_growth(make_ctx) -> None:
    bad = make_ctx(model(n_layers=4, norm=False, init_std=0.5))
    (f,) = activation_growth(bad)
    assert f.where.startswith("blocks.") and f.evidence["growth"] > f.evidence["limit"]
    rms = list(f.evidence["block_rms"].values())
    assert rms == sorted(rms)  # it did grow
    assert activation_growth(make_ctx(model(n_layers=4))) == []


def test_activation_growth_needs_blocks(make_ctx) -> None:
    with pytest.raises(SkipCheck):
        activation_growth(make_ctx(model(n_layers=1)))


def test_logit_scale(make_ctx) -> None:
    (f,) = logit_scale(make_ctx(model(init_std=1.0)))
    assert f.where == "lm_head" and f.evidence["logit_std"] > LOGIT_STD_MAX
    assert logit_scale(make_ctx(model())) == []


def test_loss_init_mismatch_high_and_ok(make_ctx) -> None:
    (f,) = loss_init_mismatch(make_ctx(model(init_std=1.0)))
    assert f.severity is Severity.WARNING and f.evidence["loss"] > math.log(64) + 1
    ok = make_ctx(model())
    assert loss_init_mismatch(ok) == []


def test_loss_init_mismatch_low_when_model_sees_targets(make_ctx) -> None:
    class Cheater(nn.Module):
        """Predicts the next token by looking at it: a causal leak."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 8)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            nxt = torch.roll(input_ids, -1, dims=1)
            return 10 * nn.functional.one_hot(nxt, 64).float() + 0 * self.embed(input_ids).sum()

    (f,) = loss_init_mismatch(make_ctx(Cheater()))
    assert "below" in f.title and f.evidence["deficit"] > 0.5


def test_loss_init_mismatch_nonfinite(make_ctx) -> None:
    x = torch.randint(0, 64, (2, 16))

    def nan_loss(m, batch):  # finite logits, valid targets, a broken loss
        return m(batch["input_ids"]).logsumexp(-1).mean() * float("nan")

    ctx = make_ctx(model(), {"input_ids": x, "labels": x}, loss_fn=nan_loss)
    (f,) = loss_init_mismatch(ctx)
    assert f.severity is Severity.ERROR
    # every label ignored: data.labels-all-ignored's finding, not a second error here
    # (TinyGPT's forward takes no labels: they are left out of the call and used by the loss)
    ctx = make_ctx(model(), {"input_ids": x, "labels": torch.full_like(x, -100)})
    with pytest.raises(SkipCheck, match="no valid target"):
        loss_init_mismatch(ctx)


def test_loss_init_mismatch_uses_the_outputs_loss(make_ctx) -> None:
    class WithLoss(TinyGPT):
        def forward(self, input_ids):
            logits = super().forward(input_ids)
            return {"logits": logits, "loss": logits.sum() * 0 + 100.0}  # a summed loss, say

    torch.manual_seed(0)
    (f,) = loss_init_mismatch(make_ctx(WithLoss()))
    assert f.evidence["loss"] == pytest.approx(100.0)
