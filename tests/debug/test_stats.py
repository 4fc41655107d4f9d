"""Every statistic of tdiag.stats against a naive reference computed directly."""

from __future__ import annotations

import math

import pytest
import torch

from tdiag.stats import STAT_NAMES, global_norm, per_tensor_norms, stats_dict, tensor_stats


def naive_stats(t: torch.Tensor) -> list[float]:
    vals = [float(v) for v in t.flatten().tolist()]
    finite = all(math.isfinite(v) for v in vals)
    abs_max = max(abs(v) for v in vals) if all(not math.isnan(v) for v in vals) else math.nan
    rms = math.sqrt(sum(v * v for v in vals) / len(vals))
    zero = sum(1 for v in vals if v == 0) / len(vals)
    return [1.0 if finite else 0.0, abs_max, rms, zero]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_tensor_stats_match_naive(dtype: torch.dtype) -> None:
    t = torch.randn(7, 5).to(dtype)
    t[0, :3] = 0
    got = tensor_stats(t)
    assert got.dtype == torch.float32 and got.shape == (4,)
    ref = naive_stats(t.double())
    for name, g, r in zip(STAT_NAMES, got.tolist(), ref, strict=True):
        assert g == pytest.approx(r, rel=1e-3), name


@pytest.mark.parametrize(
    ("bad", "abs_max_nan"), [(math.nan, True), (math.inf, False), (-math.inf, False)]
)
def test_tensor_stats_nonfinite(bad: float, abs_max_nan: bool) -> None:
    t = torch.randn(100)
    t[37] = bad
    s = stats_dict(tensor_stats(t).tolist())
    assert s["finite"] == 0.0
    assert math.isnan(s["abs_max"]) == abs_max_nan


def test_tensor_stats_integer_empty_and_no_grad() -> None:
    assert tensor_stats(torch.tensor([0, -4, 2])).tolist() == pytest.approx(
        naive_stats(torch.tensor([0.0, -4.0, 2.0]))
    )
    assert tensor_stats(torch.zeros(0)).tolist() == [1.0, 0.0, 0.0, 0.0]
    x = torch.randn(3, requires_grad=True)
    assert not tensor_stats(x * 2).requires_grad


def test_norms_match_naive() -> None:
    ts = [torch.randn(3, 4), torch.randn(10), torch.randn(2, 2, 2).double()]
    naive = [math.sqrt(sum(v * v for v in t.flatten().tolist())) for t in ts]
    assert per_tensor_norms(ts).tolist() == pytest.approx(naive, rel=1e-5)
    assert global_norm(ts).item() == pytest.approx(math.sqrt(sum(n * n for n in naive)), rel=1e-5)
    assert global_norm([]).item() == 0.0
    assert per_tensor_norms([]).numel() == 0


def test_global_norm_matches_clip_grad_norm() -> None:
    m = torch.nn.Linear(8, 8)
    m(torch.randn(4, 8)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    ref = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1e9)
    assert global_norm(grads).item() == pytest.approx(ref.item(), rel=1e-6)
