"""`tdiag check` on models not written for it, as a new user would bring them.

Each fixture is a clean model of a common style; the whole check suite must run on it (no
check crashing with status "error") and report no error-level finding (exit code 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdiag.debug.runner import check_command

ROOT = Path(__file__).parents[2]
MODELS = Path(__file__).parent / "models"


def check_json(
    target: Path, capsys: pytest.CaptureFixture[str], *extra: str, device: str = "cpu"
) -> tuple[int, dict]:
    """Run the `tdiag check --json` command in-process; returns (exit code, parsed JSON)."""
    capsys.readouterr()
    code = check_command(
        str(target), json_out=True, no_causal="--no-causal" in extra, timeout=120, device=device
    )
    out = capsys.readouterr().out
    return code, json.loads(out)


def assert_clean(code: int, report: dict) -> None:
    crashed = [(c["id"], c["status"]) for c in report["checks"] if c["status"] == "error"]
    assert not crashed, crashed
    errors = [
        (f["id"], f["where"], f["message"]) for f in report["findings"] if f["severity"] == "error"
    ]
    assert not errors, errors
    assert code == 0 and report["summary"]["errors"] == 0


CLEAN = {
    "reference": ROOT / "reference_model" / "model.py",
    "torch-transformer-encoder": MODELS / "b2_torch_encoder.py",
    "nanogpt": MODELS / "b2_nanogpt.py",
    "llama-rmsnorm-rope-swiglu": MODELS / "b2_llama.py",
    "encoder-causal-false-dict-batch": MODELS / "b2_encoder.py",
    "gpt-dict-batch-kv-cache": MODELS / "b2_gpt.py",
    "factory-only-fixed-length": MODELS / "b2_fixed_length.py",
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_model_has_no_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = check_json(CLEAN[name], capsys)
    assert_clean(code, report)
    ran = {c["id"]: c["status"] for c in report["checks"]}
    # the B2 families really ran (not all skipped) on every model
    assert ran["grad.missing"] == "pass" and ran["batch.mixing"] == "pass"
    assert ran["train.cannot-overfit"] in ("pass", "fail")  # a warning is allowed, not an error


def test_bidirectional_checks_apply_to_encoders(capsys: pytest.CaptureFixture[str]) -> None:
    _, report = check_json(MODELS / "b2_encoder.py", capsys)
    ran = {c["id"]: c["status"] for c in report["checks"]}
    assert ran["causal.leak"] == "skipped"
    assert ran["position.missing"] == "pass" and ran["padding.leak"] == "pass"


def test_no_causal_flag_on_a_causal_model(capsys: pytest.CaptureFixture[str]) -> None:
    # --no-causal on a decoder: causal.leak is skipped, position.missing runs and passes
    # (the causal mask itself breaks permutation symmetry)
    code, report = check_json(MODELS / "b2_nanogpt.py", capsys, "--no-causal")
    ran = {c["id"]: c["status"] for c in report["checks"]}
    assert ran["causal.leak"] == "skipped" and ran["position.missing"] == "pass"
    assert_clean(code, report)


def test_faulty_model_fails_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = check_json(MODELS / "b2_causal_none.py", capsys)
    assert code == 1
    leak = [f for f in report["findings"] if f["id"] == "causal.leak"]
    assert leak and leak[0]["where"] == "blocks.0.attn"
    assert leak[0]["docs"] == "docs/checks.md#causal-leak"


HF = {
    "b2_hf_gpt2": ("causal.leak", "padding.leak", "attn.entropy-collapse", "grad.missing"),
    "b2_hf_llama": ("causal.leak", "padding.leak", "attn.entropy-collapse", "grad.dead-units"),
    "b2_hf_bert": ("position.missing", "padding.leak", "attn.entropy-collapse", "batch.mixing"),
}


@pytest.mark.hf
@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_model_from_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, report = check_json(MODELS / f"{name}.py", capsys)
    assert_clean(code, report)
    ran = {c["id"]: c["status"] for c in report["checks"]}
    for cid in HF[name]:
        assert ran[cid] == "pass", cid  # really ran, and found nothing


@pytest.mark.gpu
def test_checks_run_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = check_json(MODELS / "b2_gpt.py", capsys, device="cuda")
    assert_clean(code, report)
    code, report = check_json(MODELS / "b2_causal_shifted.py", capsys, device="cuda")
    assert code == 1
    assert [f["where"] for f in report["findings"] if f["id"] == "causal.leak"] == ["blocks.0.attn"]
