"""Positional encodings: sinusoidal closed form and extrapolation; RoPE relative positions."""

from __future__ import annotations

import math

import torch

from reference_model.model import Rotary, SinusoidalPositions, sinusoidal_encoding


def _closed_form(length: int, d: int, offset: int = 0) -> torch.Tensor:
    pe = torch.empty(length, d, dtype=torch.float64)
    for pos in range(offset, offset + length):
        for i in range(0, d, 2):
            angle = pos / (10000 ** (i / d))
            pe[pos - offset, i] = math.sin(angle)
            if i + 1 < d:
                pe[pos - offset, i + 1] = math.cos(angle)
    return pe.float()


def test_sinusoidal_matches_formula() -> None:
    torch.testing.assert_close(sinusoidal_encoding(50, 16), _closed_form(50, 16), atol=1e-5, rtol=0)


def test_sinusoidal_extrapolates_beyond_buffer() -> None:
    pos = SinusoidalPositions(max_len=8, d_model=16, base=10000.0)
    inside = pos(8)
    beyond = pos(20)  # longer than the buffer: computed on the fly
    torch.testing.assert_close(inside, _closed_form(8, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(beyond, _closed_form(20, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos(4, offset=30), _closed_form(4, 16, offset=30), atol=1e-5, rtol=0)


def _rotated_at(rot: Rotary, v: torch.Tensor, position: int) -> torch.Tensor:
    return rot(v.view(1, 1, 1, -1), offset=position).view(-1)


def test_rope_dot_product_depends_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rot = Rotary(max_len=16, head_dim=8, base=10000.0)
    q, k = torch.randn(8), torch.randn(8)
    for m, n in [(0, 3), (5, 2), (7, 7)]:
        ref = _rotated_at(rot, q, m) @ _rotated_at(rot, k, n)
        for shift in (1, 4, 30):  # 30 is beyond the precomputed table
            shifted = _rotated_at(rot, q, m + shift) @ _rotated_at(rot, k, n + shift)
            torch.testing.assert_close(shifted, ref, atol=1e-4, rtol=1e-4)
    # ... and does depend on the relative distance (so the check above can fail)
    d1 = _rotated_at(rot, q, 0) @ _rotated_at(rot, k, 1)
    d5 = _rotated_at(rot, q, 0) @ _rotated_at(rot, k, 5)
    assert not torch.allclose(d1, d5, atol=1e-3)


def test_rope_preserves_norm_and_is_identity_at_zero() -> None:
    torch.manual_seed(1)
    rot = Rotary(max_len=16, head_dim=8, base=10000.0)
    x = torch.randn(2, 3, 10, 8)
    y = rot(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
