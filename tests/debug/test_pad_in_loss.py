"""data.pad-in-loss: padded positions must not be targets of the loss.

pad_loss_labels.py pads 21 of its 64 positions (rows of 16, 9, 12 and 6 real tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tdiag.debug.pad_loss import ERROR_FRAC, check_pad_in_loss
from tdiag.debug.registry import SkipCheck
from tdiag.debug.runner import CheckResult, check_command, run_checks
from tdiag.findings import Severity
from tdiag.loading import load_target

ROOT = Path(__file__).parents[2]
MODELS = Path(__file__).parent / "models"
ID = "data.pad-in-loss"
N_PADS = 21  # 0 + 7 + 4 + 10
# a shifted loss scores 15 targets per row (60); the gradient sees the pads predicted from a pad:
# all but the first pad of the three padded rows
N_GRAD_HITS = N_PADS - 3


def run_one(name: str) -> CheckResult:
    path = ROOT / "reference_model" / "model.py" if name == "reference" else MODELS / f"{name}.py"
    (result,) = run_checks(load_target(str(path)), only=ID).results
    assert result.status != "error", result.message
    return result


def test_labels_with_pad_ids_counted_by_the_models_loss() -> None:
    (f,) = run_one("pad_loss_labels").findings
    assert f.id == ID and f.severity is Severity.ERROR
    assert f.docs == "docs/checks.md#data-pad-in-loss"
    ev = f.evidence
    assert ev["pads_in_loss"] == N_GRAD_HITS and ev["pad_positions"] == N_PADS
    assert ev["labels_not_ignored_at_pads"] == N_PADS  # every pad label is the pad id 0
    assert ev["loss_targets"] == 60
    assert ev["fraction_of_loss_targets"] == pytest.approx(N_GRAD_HITS / 60, abs=1e-4)
    assert ev["fraction_of_loss_targets"] >= ERROR_FRAC
    assert ev["fraction_of_pads"] == pytest.approx(N_GRAD_HITS / N_PADS, abs=1e-4)
    assert ev["example"] == {"row": 1, "pos": 9, "label": 0}  # row 1 has 9 real tokens
    assert ev["loss"] == "the model's own loss (output.loss)"
    assert f"At least {N_GRAD_HITS} of the {N_PADS} padded positions" in f.message
    assert "30%" in f.message and "row 1, position 9" in f.message
    assert "masked_fill(attention_mask == 0, -100)" in f.recommendation


def test_loss_fn_taking_targets_from_input_ids() -> None:
    (f,) = run_one("pad_loss_fn").findings  # no labels in the batch: only the gradient tells
    assert f.severity is Severity.ERROR
    assert f.evidence["pads_in_loss"] == N_GRAD_HITS
    assert f.evidence["loss"] == "the file's loss_fn"
    assert "labels_not_ignored_at_pads" not in f.evidence and "label" not in f.evidence["example"]


@pytest.mark.parametrize(
    "name",
    [
        "pad_loss_labels_masked",  # -100 at the pads
        "pad_loss_ignore_pad",  # pad ids in the labels, but ignore_index=PAD in the loss
        "pad_loss_fn_masked",  # the loss_fn masks its targets with the attention mask
        "label_leak_own_loss_shifted",  # one padded row, -100 there
    ],
)
def test_correct_losses_stay_quiet(name: str) -> None:
    r = run_one(name)
    assert r.status == "pass" and r.findings == []


@pytest.mark.hf
def test_hugging_face_gpt2() -> None:
    pytest.importorskip("transformers")
    (f,) = run_one("pad_loss_hf_gpt2").findings  # labels = input_ids after padding
    assert f.severity is Severity.ERROR and f.evidence["pad_positions"] == 18
    assert f.evidence["labels_not_ignored_at_pads"] == 18
    assert f.evidence["pads_in_loss"] == 16  # 18 pads in 2 rows, the first of each not judged
    assert run_one("b2_hf_gpt2").status == "pass"  # -100 on its pads


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("reference", "no padding"),
        ("b2_gpt", "default cross-entropy ignores padding"),  # mask, no labels, no own loss
        ("b2_nanogpt", "random batch"),
    ],
)
def test_skipped_when_nothing_to_check(name: str, reason: str) -> None:
    r = run_one(name)
    assert r.status == "skipped" and reason in r.message


# -- CheckContexts built in code ------------------------------------------------------------------
def _lm():
    from label_leak_own_loss import LM

    torch.manual_seed(0)
    return LM(shift=True)


def _batch(*, left: bool, labels_at_pads: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :5] = 0
    else:
        mask[1, -5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, labels_at_pads),
    }


@pytest.mark.parametrize("left", [False, True])
def test_left_and_right_padding(left: bool, make_ctx) -> None:
    # Hugging Face's convention: -100 at pads; with left padding the last pad predicts the
    # first real token, which a shifted loss counts: that is not a pad target
    assert check_pad_in_loss(make_ctx(_lm(), _batch(left=left, labels_at_pads=-100))) == []
    (f,) = check_pad_in_loss(make_ctx(_lm(), _batch(left=left, labels_at_pads=0)))
    assert f.evidence["pad_positions"] == (4 if left else 5)  # the last left pad is not judged
    # right: the pads at 12..15 are predicted from a pad (11..14); left: 1..4 from 0..3
    assert f.evidence["pads_in_loss"] == 4
    assert f.evidence["example"]["row"] == 1


def test_few_pads_are_a_warning(make_ctx) -> None:
    b = _batch(left=False, labels_at_pads=0)
    b["attention_mask"][1, :-2] = 1  # only the last 2 positions of one row padded
    b["input_ids"][1, :-2] = b["labels"][1, :-2] = 7
    (f,) = check_pad_in_loss(make_ctx(_lm(), b))
    assert f.evidence["pads_in_loss"] == 1 and f.evidence["fraction_of_loss_targets"] < ERROR_FRAC
    assert f.severity is Severity.WARNING


def test_default_loss_on_labels_is_a_warning(tiny_gpt, make_ctx) -> None:
    # no loss of the file's own: tdiag's cross-entropy on the labels counts the pad ids, but
    # the user's training loss may ignore them
    (f,) = check_pad_in_loss(make_ctx(tiny_gpt, _batch(left=False, labels_at_pads=0)))
    assert f.severity is Severity.WARNING
    assert "tdiag's default loss" in f.message and f.evidence["pads_in_loss"] == 4


def test_without_a_gradient_the_labels_decide(make_ctx) -> None:
    frozen = _lm().requires_grad_(False)  # no gradient reaches the logits
    (f,) = check_pad_in_loss(make_ctx(frozen, _batch(left=False, labels_at_pads=0)))
    assert (
        f.severity is Severity.WARNING
        and f.evidence["probe"] == "labels only"
        and "labels only" in f.message
    )
    assert f.evidence["pads_in_loss"] == 5 and f.evidence["pad_positions"] == 5
    assert check_pad_in_loss(make_ctx(frozen, _batch(left=False, labels_at_pads=-100))) == []


def test_zero_initialised_head_still_seen(make_ctx) -> None:
    # uniform logits make every cross-entropy exactly ln V: a perturbation of the labels would
    # not change the loss, its gradient still does
    model = _lm()
    torch.nn.init.zeros_(model.lm_head.weight)
    (f,) = check_pad_in_loss(make_ctx(model, _batch(left=False, labels_at_pads=0)))
    assert f.evidence["pads_in_loss"] == 4


def test_pads_by_id_only_at_the_row_ends(make_ctx) -> None:
    from b1_tiny import TinyGPT

    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 5] = 0  # a pad id in the middle of a row: a real token (GPT-2's pad is its EOS)
    ids[1, -3:] = 0  # right padding

    def loss_fn(model, x):  # takes its targets from the ids, masks nothing
        return F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    (f,) = check_pad_in_loss(make_ctx(TinyGPT(), ids, pad_id=0, loss_fn=loss_fn))
    assert f.evidence["pad_positions"] == 3 and f.evidence["pads_in_loss"] == 2
    assert f.evidence["padding"] == "pad id 0 at the row ends"


def test_no_padding_is_skipped(make_ctx, tiny_gpt) -> None:
    ids = torch.randint(1, 64, (2, 16))
    with pytest.raises(SkipCheck, match="no padding"):
        check_pad_in_loss(
            make_ctx(tiny_gpt, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        )


def test_the_model_is_left_untouched() -> None:
    ctx = load_target(str(MODELS / "pad_loss_labels.py"))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    (r,) = run_checks(ctx, only=ID).results
    assert r.status == "fail"
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters(), strict=True))
    assert all(p.grad is None for p in ctx.model.parameters())


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for name, code in (("pad_loss_fn", 1), ("pad_loss_fn_masked", 0)):
        capsys.readouterr()
        assert check_command(str(MODELS / f"{name}.py"), json_out=True, only=ID) == code
        report = json.loads(capsys.readouterr().out)
        assert [c["id"] for c in report["checks"]] == [ID]
        assert [f["id"] for f in report["findings"]] == [ID] * code
