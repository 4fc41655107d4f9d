"""Gradient checks: each on a model file that has the fault and on one that does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdiag.debug.runner import CheckResult, run_checks
from tdiag.findings import Severity
from tdiag.loading import load_target

MODELS = Path(__file__).parent / "models"


def run_one(name: str, check_id: str) -> CheckResult:
    ctx = load_target(str(MODELS / f"{name}.py"))
    (result,) = run_checks(ctx, only=check_id).results
    assert result.status != "error", result.message
    return result


@pytest.mark.parametrize("clean", ["b2_gpt", "b2_mlp_stack", "b2_relu", "b2_frozen_embedding"])
def test_clean_models_have_no_gradient_findings(clean: str) -> None:
    ctx = load_target(str(MODELS / f"{clean}.py"))
    run = run_checks(ctx, only="gradients")
    assert [r.status for r in run.results] == ["pass"] * 4, [
        (r.id, r.findings) for r in run.results
    ]


def test_exploding_global_norm() -> None:
    r = run_one("b2_exploding", "grad.exploding")
    (f,) = r.findings
    assert f.severity is Severity.ERROR
    assert f.evidence["grad_norm"] > 1e3
    assert "clip" in f.recommendation.lower()


def test_exploding_with_depth_names_the_first_block() -> None:
    r = run_one("b2_exploding_depth", "grad.exploding")
    (f,) = r.findings
    assert f.where == "layers.0"
    assert f.evidence["grad_norm"] < 1e3  # found by the depth profile, not the global norm
    assert f.evidence["first_to_last_ratio"] > 100


def test_vanishing_with_depth() -> None:
    r = run_one("b2_vanishing", "grad.vanishing")
    (f,) = r.findings
    assert f.severity is Severity.ERROR and f.where == "layers.0"
    norms = list(f.evidence["block_grad_norms"].values())
    assert norms[0] < 1e-2 * norms[-1]
    assert run_one("b2_vanishing", "grad.exploding").findings == []


def test_unused_layer_is_a_warning() -> None:
    (f,) = run_one("b2_unused_layer", "grad.missing").findings
    assert f.severity is Severity.WARNING
    assert f.where == "extra_head"
    assert sorted(f.evidence["parameters"]) == ["extra_head.bias", "extra_head.weight"]


def test_detached_branch_is_an_error() -> None:
    (f,) = run_one("b2_detached_branch", "grad.missing").findings
    assert f.severity is Severity.ERROR
    assert f.evidence["parameters"] == ["pos.weight"]
    assert "detach" in f.recommendation


def test_frozen_parameter_is_not_missing() -> None:
    ctx = load_target(str(MODELS / "b2_frozen_embedding.py"))
    assert not ctx.model.pos.weight.requires_grad
    (r,) = run_checks(ctx, only="grad.missing").results
    assert r.status == "pass" and r.findings == []


def test_dead_relu_units() -> None:
    (f,) = run_one("b2_dead_relu", "grad.dead-units").findings
    assert f.severity is Severity.ERROR
    assert f.where == "blocks.0.mlp.out"
    assert f.evidence["dead_fraction"]["blocks.0.mlp.out"] == 1.0
    assert run_one("b2_relu", "grad.dead-units").findings == []


def test_gradient_pass_leaves_the_model_untouched() -> None:
    from tdiag.debug.gradients import grad_pass

    ctx = load_target(str(MODELS / "b2_batchnorm.py"))
    bn = ctx.model.blocks[0].ln1
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    grad_pass(ctx)
    assert all(p.grad is None for p in ctx.model.parameters())
    assert not any(m.training for m in ctx.model.modules())
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert "gradients.pass" in ctx.cache
