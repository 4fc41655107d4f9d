"""Multi-head attention against torch.nn.MultiheadAttention with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference_model.config import ModelConfig
from reference_model.model import MultiHeadAttention

D, H, B, L = 32, 4, 3, 7


def _pair(causal: bool) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, n_heads=H, n_layers=1, max_seq_len=16, causal=causal)
    ours = MultiHeadAttention(cfg).eval()
    for p in ours.parameters():  # not the tiny init: make differences visible
        nn.init.normal_(p, std=0.3)
    ref = nn.MultiheadAttention(D, H, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)  # packed [q; k; v], same layout
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    return ours, ref


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, 3:] = 0
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("return_attn", [False, True])
def test_mha_matches_torch(causal: bool, padded: bool, return_attn: bool) -> None:
    ours, ref = _pair(causal)
    x = torch.randn(B, L, D)
    mask = _padding_mask() if padded else None
    causal_mask = (
        torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if causal else None
    )  # True = blocked
    key_padding = (mask == 0) if mask is not None else None
    with torch.no_grad():
        got, probs = ours(x, attention_mask=mask, return_attn=return_attn)
        want, want_probs = ref(
            x, x, x, attn_mask=causal_mask, key_padding_mask=key_padding, average_attn_weights=False
        )
    real = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool)
    # Only real query positions: padded queries are don't-care (torch gives them a full row,
    # ours attends to itself).
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    if return_attn:
        assert probs is not None and probs.shape == (B, H, L, L)
        torch.testing.assert_close(
            probs.permute(0, 2, 1, 3)[real],
            want_probs.permute(0, 2, 1, 3)[real],
            atol=1e-6,
            rtol=1e-5,
        )
    else:
        assert probs is None


def test_mha_detects_a_wrong_mask() -> None:
    """The comparison above can fail: a causal module differs from an unmasked reference."""
    ours, ref = _pair(causal=True)
    x = torch.randn(B, L, D)
    with torch.no_grad():
        got, _ = ours(x)
        want, _ = ref(x, x, x)
    assert not torch.allclose(got, want, atol=1e-3)


def test_fully_masked_rows_are_finite() -> None:
    """Left padding with a causal mask: the first (padded) query sees no real key."""
    ours, _ = _pair(causal=True)
    x = torch.randn(B, L, D)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        y, _ = ours(x, attention_mask=mask)
        y2, probs = ours(x, attention_mask=mask, return_attn=True)
    assert torch.isfinite(y).all() and torch.isfinite(y2).all()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-4)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    # a real query never attends to a padded key
    assert probs[0, :, 3:, :3].abs().max() == 0
