"""data.label-leak: a copy trained on fresh random tokens must not beat ln V.

Each fault file has correct look-alikes that differ only in the shift (or the masking)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tdiag.debug.label_leak import (
    LEAK_FRAC,
    MAX_STEPS,
    MIN_STEPS,
    PARTIAL_FRAC,
    PROBE_LR,
    _decided,
    _floor,
    _verdict,
    check_label_leak,
)
from tdiag.debug.runner import CheckResult, check_command, run_checks
from tdiag.findings import Severity
from tdiag.loading import load_target

ROOT = Path(__file__).parents[2]
MODELS = Path(__file__).parent / "models"
ID = "data.label-leak"


def run_one(name: str) -> CheckResult:
    path = ROOT / "reference_model" / "model.py" if name == "reference" else MODELS / f"{name}.py"
    (result,) = run_checks(load_target(str(path)), only=ID).results
    assert result.status != "error", result.message
    return result


def assert_leak(r: CheckResult) -> dict:
    (f,) = r.findings
    assert f.id == ID and f.severity is Severity.ERROR
    assert f.docs == "docs/checks.md#data-label-leak"
    ev = f.evidence
    assert ev["final_loss"] < LEAK_FRAC * ev["floor"] == pytest.approx(ev["threshold"], abs=1e-3)
    assert ev["floor"] == pytest.approx(min(ev["ln_vocab"], ev["initial_loss"]), abs=1e-3)
    assert ev["ln_vocab"] == pytest.approx(math.log(ev["vocab"]), abs=1e-3)
    assert MIN_STEPS // 2 < ev["steps"] < MAX_STEPS  # stopped early, once clearly below
    assert ev["lr"] == PROBE_LR
    assert ev["copies_input"] >= 0.5 > ev["predicts_next"]  # it learnt to repeat its input
    for key in ("initial_loss", "final_loss", "ln_vocab"):
        assert f"{ev[key]:.3g}" in f.message
    assert f"{ev['steps']} steps" in f.message
    return ev


@pytest.mark.parametrize(
    ("name", "labels", "advice"),
    [
        ("label_leak_own_loss", "labels[t] = input_ids[t] (not shifted)", "the model's loss"),
        ("label_leak_xy", "targets[t] = input_ids[t] (not shifted)", "y = x"),
        ("label_leak_loss_fn", "none in the batch", "loss_fn compares"),
    ],
)
def test_unshifted_labels_are_an_error(name: str, labels: str, advice: str) -> None:
    ev = assert_leak(r := run_one(name))
    assert ev["labels"].startswith(labels)
    assert ev["vocab"] == (128 if name == "label_leak_xy" else 64)
    # an untrained model starts near ln V; the leak takes it below half of it
    assert 0.8 * ev["ln_vocab"] < ev["initial_loss"] < 1.1 * ev["ln_vocab"]
    rec = r.findings[0].recommendation
    assert advice in rec
    assert ("logits[:, :-1]" in rec) is (name != "label_leak_xy")  # (x, y): fix the loader


def test_masked_lm_scoring_visible_tokens_is_an_error() -> None:
    r = run_one("label_leak_mlm")  # bidirectional, loss on every position, 15 % masked
    assert_leak(r)
    assert "mask token" in r.findings[0].recommendation


@pytest.mark.parametrize(
    "name",
    [
        "label_leak_own_loss_shifted",  # the same model, shifting inside its loss
        "label_leak_xy_shifted",  # nanoGPT with y = data[i + 1 : ...]
        "label_leak_loss_fn_shifted",  # the same loss_fn, shifted
        "label_leak_mlm_masked",  # bidirectional, only masked positions scored
        "b2_nanogpt",  # random batch, nanoGPT's own loss with the targets tdiag passes
        "b2_gpt",  # tdiag's default next-token loss
        "reference",
    ],
)
def test_correct_models_stay_quiet(name: str) -> None:
    r = run_one(name)
    assert r.status == "pass" and r.findings == []


@pytest.mark.hf
def test_hugging_face_models() -> None:
    pytest.importorskip("transformers")
    # GPT-2 shifts internally: labels = input_ids is right
    assert run_one("b2_hf_gpt2").status == "pass"
    # a BERT masked LM whose labels sit under [MASK]
    assert run_one("label_leak_hf_bert_mlm").status == "pass"
    # labels rolled the wrong way by hand: GPT-2's own shift lands them on the inputs
    r = run_one("label_leak_hf_gpt2_rolled")
    ev = assert_leak(r)
    assert ev["labels"] == "labels[t] = input_ids[t - 1] (shifted the wrong way)"
    assert ev["loss"] == "the model's own loss (output.loss)"
    assert "wrong way" in r.findings[0].recommendation


def test_bidirectional_without_a_hidden_target_is_skipped() -> None:
    r = run_one("b2_encoder")  # labels = its own visible inputs: nothing hidden to judge
    assert r.status == "skipped" and "no hidden target" in r.message
    assert "100%" in r.message


@pytest.mark.hf
def test_bidirectional_default_loss_is_skipped() -> None:
    pytest.importorskip("transformers")
    r = run_one("b2_hf_bert")  # no labels, no loss: tdiag's default loss is the identity
    assert r.status == "skipped" and "made-up targets" in r.message


def test_the_model_is_left_untouched() -> None:
    ctx = load_target(str(MODELS / "label_leak_loss_fn.py"))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    (r,) = run_checks(ctx, only=ID).results
    assert r.status == "fail"
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters(), strict=True))
    assert all(p.grad is None for p in ctx.model.parameters())
    assert not ctx.model.training


# -- losses of other scales, partial leaks (CheckContext built in code) --------------------------
def _ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


LOSSES = {
    # loss_fn(model, ids): (leaks?, the loss)
    "mean/8, shifted": (False, lambda m, x: _ce(m(x)[:, :-1], x[:, 1:]) / 8),
    "mean/8, unshifted": (True, lambda m, x: _ce(m(x), x) / 8),
    "sum, shifted": (False, lambda m, x: _ce(m(x)[:, :-1], x[:, 1:], "sum")),
    "sum, unshifted": (True, lambda m, x: _ce(m(x), x, "sum")),
    "label smoothing 0.1, unshifted": (
        True,
        lambda m, x: F.cross_entropy(m(x).flatten(0, 1), x.flatten(), label_smoothing=0.1),
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_scaled_and_summed_losses(name: str, tiny_gpt, make_ctx) -> None:
    leaks, loss_fn = LOSSES[name]
    findings = check_label_leak(make_ctx(tiny_gpt, loss_fn=loss_fn, seed=0))
    if not leaks:
        assert findings == [], findings[0].message
        return
    (f,) = findings
    assert f.severity is Severity.ERROR
    # judged against what the loss would stay at: ln V, its own start when divided by 8, or
    # about n_targets · ln V when summed
    ev = f.evidence
    expected = ev["initial_loss"] if name.startswith(("sum", "mean/8")) else ev["ln_vocab"]
    assert ev["floor"] == pytest.approx(expected, abs=1e-3)
    assert ev["summed"] is name.startswith("sum")


def test_a_partial_leak_is_a_warning(tiny_gpt, make_ctx) -> None:
    def loss_fn(model, x):  # 60 % of the targets are the visible token, 40 % random noise
        logits = model(x)
        noisy = torch.where(torch.rand(x.shape) < 0.6, x, torch.randint(0, 64, x.shape))
        return _ce(logits, noisy)

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    (f,) = check_label_leak(make_ctx(tiny_gpt, ids, loss_fn=loss_fn))
    assert f.severity is Severity.WARNING and f.title.startswith("Labels are partly")
    ev = f.evidence
    assert LEAK_FRAC * ev["floor"] <= ev["final_loss"] < PARTIAL_FRAC * ev["floor"]
    assert ev["steps"] == MAX_STEPS  # still falling: no early stop


def test_verdict_and_floor() -> None:
    ln_v = math.log(64)
    assert _verdict(0.49 * ln_v, ln_v) is Severity.ERROR
    assert _verdict(0.79 * ln_v, ln_v) is Severity.WARNING
    assert _verdict(0.81 * ln_v, ln_v) is None
    assert _floor(1.3 * ln_v, ln_v, 64) == ln_v  # overconfident init: still judged on ln V
    assert _floor(ln_v / 8, ln_v, 64) == ln_v / 8  # a scaled-down loss: on its own start
    assert _floor(60 * ln_v, ln_v, 64) == 60 * ln_v  # summed over 64 targets (63 shifted)


def test_stopping_rule() -> None:
    ln_v = math.log(64)
    flat = [ln_v * (1.01 if i % 2 else 0.99) for i in range(MIN_STEPS)]
    assert _decided(flat, ln_v)  # learns nothing: stop at MIN_STEPS
    assert not _decided(flat[:-1], ln_v)
    falling = [ln_v * (1 - 0.02 * i) for i in range(MIN_STEPS)]
    assert not _decided(falling, ln_v)  # a leak being learnt: keep going
    assert _decided([ln_v, ln_v * 0.4, ln_v * 0.3, ln_v * 0.3], ln_v)  # clearly below


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for name, code in (("label_leak_loss_fn", 1), ("label_leak_loss_fn_shifted", 0)):
        capsys.readouterr()
        assert check_command(str(MODELS / f"{name}.py"), json_out=True, only=ID) == code
        report = json.loads(capsys.readouterr().out)
        assert [c["id"] for c in report["checks"]] == [ID]
        assert report["summary"]["errors"] == code
