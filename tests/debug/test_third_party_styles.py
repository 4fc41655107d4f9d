"""`tdiag check` on model files in the style of real third-party code (issue 8, point 8).

- pytorch/examples' word-language Transformer: sequence-first, dropout 0.2, a generated
  causal mask. Wrapped batch-first it is clean (no false ``batch.mixing`` from dropout masks
  that differ between the compared forwards); fed batch-first ids unwrapped, its causal mask
  runs along the batch and ``batch.mixing`` must say so.
- a nanoGPT-style forward whose loss with targets raises: exit 2 with the user's exception.
- a stock ``nn.TransformerEncoder`` with ``src_key_padding_mask``: no nested-tensor fast path,
  nothing on stderr, and ``init.activation-growth`` runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug import CHECKS, SkipCheck
from tdiag.debug.probes import clean_batch, controlled, fastpath_off, perturbed_forward
from tdiag.debug.runner import check_command, run_checks
from tdiag.debug.structure import _sample_splits
from tdiag.findings import Severity
from tdiag.loading import LoadError, load_target

MODELS = Path(__file__).parent / "models"
ROOT = Path(__file__).parents[2]

# pytorch/examples builds its encoder with the default enable_nested_tensor=True and
# batch_first=False, for which PyTorch warns at construction: the user's warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")


def run_json(path: Path, capsys: pytest.CaptureFixture[str], only: str | None = None) -> tuple:
    capsys.readouterr()
    code = check_command(str(path), json_out=True, only=only, timeout=60)
    return code, json.loads(capsys.readouterr().out)


def statuses(report: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["checks"]}


# -- defect 1: no false batch.mixing on the sequence-first word-language model --------------------
def test_word_lm_wrapped_batch_first_has_no_false_positive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, report = run_json(MODELS / "b3_word_lm.py", capsys, only="structure,init")
    assert statuses(report)["batch.mixing"] == "pass"
    assert statuses(report)["causal.leak"] == "pass"
    assert [f["id"] for f in report["findings"] if f["severity"] != "info"] == []
    assert code == 0


def test_word_lm_perturbation_uses_the_token_id_fallback_with_dropout_on() -> None:
    # what makes the test above meaningful: the embedding output is (L, B, D), so the
    # embedding noise cannot apply and the perturbed forward is repeated with other token
    # ids, in train mode where dropout (also inside nn.MultiheadAttention) draws masks
    ctx = load_target(str(MODELS / "b3_word_lm.py"))
    batch = clean_batch(ctx)
    where = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    where[1:] = True
    retried = []
    with torch.no_grad(), controlled(ctx.model, train=True, seed=0):
        out = perturbed_forward(ctx, batch, where, ctx.forward, on_retry=lambda: retried.append(1))
    with torch.no_grad(), controlled(ctx.model, train=True, seed=0):
        base = ctx.forward(batch)
    with torch.no_grad(), controlled(ctx.model, train=True, seed=1):
        other_masks = ctx.forward(batch)
    assert retried == [1]
    assert torch.equal(out[0], base[0])  # sample 0 untouched: the same dropout masks
    assert not torch.allclose(other_masks[0], base[0])  # dropout is live in train mode


# -- defect 2: a sequence-first module fed (B, L, D) under a causal mask ------------------------
def test_sequence_first_module_fed_batch_first_is_batch_mixing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, report = run_json(MODELS / "b3_word_lm_batch_first_input.py", capsys, only="structure")
    (f,) = [f for f in report["findings"] if f["id"] == "batch.mixing"]
    assert f["severity"] == "error" and code == 1
    assert f["where"] == "transformer_encoder.layers.0.self_attn"
    assert "batch_first=False" in f["message"]
    # the causal mask runs along the batch: a later sample sees an earlier one
    ev = f["evidence"]
    assert min(ev["perturbed_samples"]) < max(ev["changed_samples"])
    assert statuses(report)["causal.leak"] == "pass"  # along each sequence nothing leaks


@pytest.mark.parametrize("n", range(2, 10))
def test_sample_splits_cover_every_ordered_pair(n: int) -> None:
    splits = _sample_splits(n)
    covered = {(j, i) for pert, watch in splits for j in pert for i in watch}
    assert covered == set(itertools.permutations(range(n), 2))
    assert len(splits) == 2 * (n - 1).bit_length()


def test_batch_mixing_found_whichever_sample_sees_the_others(make_ctx) -> None:
    # a model where only the LAST sample reads the others (a cumulative mean over the batch):
    # watching sample 0 alone would miss it
    class BatchCumMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 8)
            self.head = nn.Linear(8, 64)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.emb(input_ids)  # (B, L, D)
            n = torch.arange(1, x.shape[0] + 1)[:, None, None]
            return self.head(x.cumsum(0) / n)

    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    (r,) = run_checks(make_ctx(BatchCumMean(), ids), only="batch.mixing").results
    (f,) = r.findings
    assert f.severity is Severity.ERROR and 0 not in f.evidence["changed_samples"]
    clean = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 64))
    (r,) = run_checks(make_ctx(clean, ids), only="batch.mixing").results
    assert r.status == "pass" and r.findings == []


# -- defect 3: the retry with targets raises ---------------------------------------------------
def test_retry_with_targets_that_raises_shows_the_users_exception() -> None:
    res = CliRunner().invoke(app, ["check", str(MODELS / "b3_targets_loss_raises.py")])
    assert res.exit_code == 2
    err = res.stderr
    assert "forward pass raised ValueError: Expected input batch_size (64)" in err
    assert "model(input_ids, targets=next-token ids)" in err
    assert "without targets it returns logits of shape (4, 1, 40)" in err
    assert "Traceback (your code only):" in err
    assert "b3_targets_loss_raises.py" in err and "F.cross_entropy(logits.view(-1, V)" in err
    assert "torch/nn" not in err and "tdiag/" not in err  # the user's frames only
    assert "tdiag needs the logits of every position" not in err  # not the old message


def test_retry_with_targets_that_works_loads(tmp_path: Path) -> None:
    src = (MODELS / "b3_targets_loss_raises.py").read_text()
    fixed = tmp_path / "fixed.py"
    fixed.write_text(src.replace("targets)  # bug", "targets.view(-1))  # fixed"))
    ctx = load_target(str(fixed))
    assert ctx.targets_arg == "targets"
    with pytest.raises(LoadError) as info:
        load_target(str(MODELS / "b3_targets_loss_raises.py"))
    assert info.value.cause == "forward-raised"


# -- defect 4: nn.TransformerEncoder with src_key_padding_mask in eval mode ------------------------
def test_stock_encoder_with_padding_mask_runs_every_check_quietly() -> None:
    # a real process: the CLI's stderr as a user sees it (no logging set up by pytest)
    cmd = [sys.executable, "-m", "tdiag.cli", "check", str(MODELS / "b3_torch_encoder_padmask.py")]
    cmd += ["--json", "--only", "init,numerics,structure"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no nested-tensor warning, no backend listing from a hook
    ran = statuses(json.loads(proc.stdout))
    assert ran["init.activation-growth"] == "pass"
    assert ran["padding.leak"] == "pass" and ran["batch.mixing"] == "pass"


def test_activation_growth_through_the_stock_encoder(tmp_path: Path, capsys) -> None:
    # the same encoder whose layers' output norms are initialised to grow 4x per layer (a
    # stand-in for any init that makes the block outputs grow): measured, and flagged
    src = (MODELS / "b3_torch_encoder_padmask.py").read_text()
    grows = tmp_path / "grows.py"
    grows.write_text(
        src.replace(
            "    return Encoder()",
            "    m = Encoder()\n"
            "    for i, layer in enumerate(m.encoder.layers):\n"
            "        layer.norm2.weight.data.fill_(4.0**i)\n"
            "    return m",
        )
    )
    code, report = run_json(grows, capsys, only="init.activation-growth")
    (f,) = report["findings"]
    assert f["id"] == "init.activation-growth" and f["severity"] == "warning"
    assert f["where"] == "encoder.layers.1"
    assert list(f["evidence"]["block_rms"]) == [f"encoder.layers.{i}" for i in range(3)]
    assert code == 0
    code, report = run_json(MODELS / "b3_torch_encoder_padmask.py", capsys, only="init")
    assert statuses(report)["init.activation-growth"] == "pass" and code == 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_hooks_on_nested_tensors_say_so_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    # with the fast path on (not how the checks run), the encoder's layers see nested
    # tensors: the hooks record nothing, warn in one line, and the check's reason says why
    mha = pytest.importorskip("torch.backends.mha")
    ctx = load_target(str(MODELS / "b3_torch_encoder_padmask.py"))
    assert mha.get_fastpath_enabled() and ctx.model.encoder.use_nested_tensor
    with (
        caplog.at_level(logging.WARNING, logger="tdiag.hooks"),
        pytest.raises(SkipCheck, match="could not record"),
    ):
        CHECKS["init.activation-growth"].fn(ctx)
    (rec,) = [r for r in caplog.records if r.name == "tdiag.hooks"]
    assert "NotImplementedError" in rec.getMessage() and "\n" not in rec.getMessage()


def test_fastpath_off_restores_the_settings() -> None:
    mha = pytest.importorskip("torch.backends.mha")
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2)
    assert mha.get_fastpath_enabled() and encoder.use_nested_tensor
    with pytest.raises(RuntimeError), fastpath_off(encoder):
        assert not mha.get_fastpath_enabled() and not encoder.use_nested_tensor
        raise RuntimeError
    assert mha.get_fastpath_enabled() and encoder.use_nested_tensor
