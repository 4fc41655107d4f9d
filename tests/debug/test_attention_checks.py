"""attn.entropy-collapse on models with and without attention-score scaling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdiag.debug.attention import _row_stats
from tdiag.debug.runner import CheckResult, run_checks
from tdiag.findings import Severity
from tdiag.loading import load_target

MODELS = Path(__file__).parent / "models"


def run_one(name: str) -> CheckResult:
    ctx = load_target(str(MODELS / f"{name}.py"))
    (result,) = run_checks(ctx, only="attn.entropy-collapse").results
    assert result.status != "error", result.message
    return result


def test_unscaled_attention_with_large_init_collapses() -> None:
    (f,) = run_one("b2_unscaled_attn").findings
    assert f.severity is Severity.ERROR
    assert f.where == "blocks.0.attn"
    layer = f.evidence["layers"][0]
    assert layer["peaked_frac"] > 0.5 and layer["norm_entropy"] < 0.3
    assert "sqrt" in f.recommendation


@pytest.mark.parametrize(
    "clean", ["b2_gpt", "b2_nanogpt", "b2_llama", "b2_torch_encoder", "b2_encoder"]
)
def test_healthy_attention(clean: str) -> None:
    # manual softmax, SDPA (is_causal), GQA + RoPE, nn.MultiheadAttention, bidirectional
    assert run_one(clean).status == "pass"


def test_skipped_without_attention() -> None:
    r = run_one("b2_mlp_stack")
    assert r.status == "skipped" and "attention" in r.message


def test_row_stats_against_direct_computation() -> None:
    L = 6
    uniform_causal = torch.tril(torch.ones(L, L))
    uniform_causal = uniform_causal / uniform_causal.sum(-1, keepdim=True)
    maxp, ent = _row_stats(uniform_causal[None, None], causal_rows=True)
    # rows with >= 4 keys: rows 3, 4, 5 with 4, 5, 6 keys
    assert torch.allclose(maxp, torch.tensor([1 / 4, 1 / 5, 1 / 6]))
    assert torch.allclose(ent, torch.ones(3), atol=1e-6)
    one_hot = F.one_hot(torch.arange(L), L).float()
    maxp, ent = _row_stats(one_hot[None], causal_rows=False)
    assert torch.all(maxp == 1) and torch.all(ent == 0)
    p = torch.softmax(torch.randn(2, L, L), -1)
    _, ent = _row_stats(p, causal_rows=False)
    direct = -(p * p.log()).sum(-1) / math.log(L)
    assert torch.allclose(ent, direct.flatten(), atol=1e-6)


def test_collapse_seen_inside_nn_multihead_attention(make_ctx) -> None:
    class MHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.head = nn.Linear(32, 64)
            with torch.no_grad():
                self.embed.weight.mul_(3.0)
                self.attn.in_proj_weight.normal_(0.0, 1.0)  # scores ~ d: far too large

        def forward(self, ids):
            x = self.embed(ids)
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    from tdiag.debug.attention import check_entropy_collapse

    ctx = make_ctx(MHA(), causal=False)
    (f,) = check_entropy_collapse(ctx)
    assert f.where == "attn"
