"""train.cannot-overfit: a healthy model memorises one small batch; broken ones cannot."""

from __future__ import annotations

from pathlib import Path

import torch

from tdiag.debug.runner import CheckResult, run_checks
from tdiag.debug.sanity import MAX_STEPS
from tdiag.findings import Severity
from tdiag.loading import load_target

MODELS = Path(__file__).parent / "models"


def run_one(name: str) -> tuple[CheckResult, object]:
    ctx = load_target(str(MODELS / f"{name}.py"))
    (result,) = run_checks(ctx, only="train.cannot-overfit").results
    assert result.status != "error", result.message
    return result, ctx


def test_healthy_model_overfits_and_is_untouched() -> None:
    ctx = load_target(str(MODELS / "b2_gpt.py"))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    (r,) = run_checks(ctx, only="train.cannot-overfit").results
    assert r.status == "pass", r.findings
    after = list(ctx.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for p in after)


def test_make_optimizer_with_zero_lr() -> None:
    r, _ = run_one("b2_lr_zero")
    (f,) = r.findings
    assert f.severity is Severity.ERROR
    assert f.evidence["lr"] == [0.0]
    assert f.evidence["optimizer"].startswith("make_optimizer")
    assert f.evidence["steps"] == MAX_STEPS
    assert f.evidence["best_loss"] >= 0.9 * f.evidence["initial_loss"]


def test_detached_output_cannot_train() -> None:
    r, _ = run_one("b2_detached_output")
    (f,) = r.findings
    assert f.severity is Severity.ERROR
    assert "no gradient" in f.message


def test_uses_make_optimizer_from_file() -> None:
    r, _ = run_one("b2_nanogpt")  # its make_optimizer: AdamW(lr=3e-3, betas=(0.9, 0.95))
    assert r.status == "pass", r.findings


def test_slow_model_is_a_warning_not_an_error() -> None:
    r, _ = run_one("b2_vanishing")  # sigmoid stack: the loss moves, but slowly
    (f,) = r.findings
    assert f.severity is Severity.WARNING
    assert f.evidence["best_loss"] < f.evidence["initial_loss"]


def test_model_that_only_takes_its_full_length() -> None:
    r, ctx = run_one("b2_fixed_length")  # adds a (1, 24, D) position table: 16 tokens fail
    assert r.status == "pass", r.findings
    assert ctx.input_ids.shape[1] == 24


def test_cannot_overfit_reports_the_sequence_length() -> None:
    r, _ = run_one("b2_lr_zero")
    assert r.findings[0].evidence["seq_len"] == 16
