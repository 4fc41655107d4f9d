"""`tdiag check` end to end: the JSON object of Contract 2, exit codes, --only/--skip, --seed,
the rich report, and the runner's handling of checks that raise or skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug import CHECKS
from tdiag.debug.registry import CheckSpec, SkipCheck
from tdiag.debug.render import format_evidence, render_report
from tdiag.debug.runner import run_checks, select_checks
from tdiag.findings import Finding, Severity

FAST = "data,init,numerics"  # B1's families: quick (data.label-leak trains a copy ~0.1 s)


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def as_json(result) -> dict:
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    return json.loads(result.stdout)


def test_json_shape_clean_model(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_tiny.py"), "--json", "--only", FAST)
    assert res.exit_code == 0
    obj = as_json(res)
    assert set(obj) == {"tdiag_version", "target", "summary", "checks", "findings"}
    assert set(obj["summary"]) == {"errors", "warnings", "infos"} and obj["summary"]["errors"] == 0
    ids = [c["id"] for c in obj["checks"]]
    assert ids == [i for i, s in CHECKS.items() if s.family in FAST.split(",")]
    for c in obj["checks"]:
        assert {"id", "status", "seconds"} <= set(c) <= {"id", "status", "seconds", "reason"}
        assert c["status"] in ("pass", "skipped")
        assert ("reason" in c) == (c["status"] == "skipped")
    for f in obj["findings"]:
        assert Finding.from_dict(f).to_dict() == f  # round-trips: Contract 2 fields
    assert "Errors (" not in res.stdout  # no rich text mixed into the JSON


def test_exit_1_and_where_on_a_fault(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_nan_forward.py"), "--json", "--only", FAST)
    assert res.exit_code == 1
    obj = as_json(res)
    nf = [f for f in obj["findings"] if f["id"] == "numerics.nonfinite-forward"]
    assert nf and nf[0]["where"] == "blocks.1.act" and nf[0]["severity"] == "error"
    status = {c["id"]: c["status"] for c in obj["checks"]}
    assert status["numerics.nonfinite-forward"] == "fail"
    assert status["numerics.nonfinite-backward"] == "skipped"


def test_out_of_range_tokens_skip_the_forward_checks(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_oob_tokens.py"), "--json", "--only", FAST)
    assert res.exit_code == 1
    obj = as_json(res)
    assert [f["id"] for f in obj["findings"]] == ["data.token-out-of-range"]
    status = {c["id"]: c["status"] for c in obj["checks"]}
    assert status["numerics.nonfinite-forward"] == "skipped"
    reasons = {c["id"]: c.get("reason") for c in obj["checks"]}
    assert reasons["numerics.nonfinite-forward"]  # a skipped check says why
    assert status["data.token-out-of-range"] == "fail"


def test_only_and_skip(models_dir: Path) -> None:
    target = str(models_dir / "b1_tiny.py")
    obj = as_json(check(target, "--json", "--only", "numerics.nonfinite-param,data.*"))
    assert [c["id"] for c in obj["checks"]] == [
        "data.token-out-of-range",
        "data.labels-all-ignored",
        "data.padding-heavy",
        "data.pad-in-loss",
        "data.label-leak",
        "numerics.nonfinite-param",
    ]
    obj = as_json(check(target, "--json", "--only", "data", "--skip", "data.padding-heavy"))
    assert "data.padding-heavy" not in [c["id"] for c in obj["checks"]]


@pytest.mark.parametrize("opt", ["--only", "--skip"])
def test_unknown_id_is_exit_2(models_dir: Path, opt: str) -> None:
    res = check(str(models_dir / "b1_tiny.py"), opt, "data.token-out-of-rnage")
    assert res.exit_code == 2
    assert "unknown check id(s): data.token-out-of-rnage" in res.stderr
    assert "data.token-out-of-range" in res.stderr  # lists the known ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_exit_2(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_tiny.py"), "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA device" in res.stderr
    res = check(str(models_dir / "b1_tiny.py"), "--device", "tpu9")
    assert res.exit_code == 2 and "--device" in res.stderr


def test_seed_makes_it_repeatable(tmp_path: Path) -> None:
    p = tmp_path / "seeded.py"
    p.write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))\n"
    )

    def table(seed: str) -> list:
        obj = as_json(check(str(p), "--json", "--only", "init.std-out-of-range", "--seed", seed))
        return obj["findings"][-1]["evidence"]["table"]

    assert table("1") == table("1")
    assert table("1") != table("2")


def test_rich_report_groups_by_severity(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_nan_forward.py"), "--only", FAST)
    assert res.exit_code == 1
    out = res.stdout
    # loss.init-mismatch is skipped: the NaN logits are numerics.nonfinite-forward's finding
    assert out.index("Errors (1)") < out.index("Info (1)")
    assert "the logits are not finite" in out
    assert "numerics.nonfinite-forward" in out and "blocks.1.act" in out
    assert "→" in out  # recommendations
    assert "errors found" in out


# -- runner internals -------------------------------------------------------------------------


def _spec(check_id: str, fn) -> CheckSpec:
    return CheckSpec(check_id, "test", "t", fn, 999)


def test_check_that_raises_is_status_error(tiny_gpt, make_ctx, monkeypatch) -> None:
    def boom(ctx):
        ctx.model.train()  # also: the runner must undo this
        with torch.no_grad():
            ctx.model.lm_head.weight.requires_grad_(False)
            ctx.model.pos.weight.grad = torch.ones_like(ctx.model.pos.weight)
        raise RuntimeError("kaboom")

    def skip(ctx):
        raise SkipCheck("does not apply here")

    def warn(ctx):
        return [Finding(id="test.warn", severity=Severity.WARNING, title="w")]

    def info(ctx):
        return [Finding(id="test.info", severity=Severity.INFO, title="i")]

    for i, fn in (
        ("test.boom", boom),
        ("test.skip", skip),
        ("test.warn", warn),
        ("test.info", info),
    ):
        monkeypatch.setitem(CHECKS, i, _spec(i, fn))
    ctx = make_ctx(tiny_gpt)
    run = run_checks(ctx, only="test.*")
    by_id = {r.id: r for r in run.results}
    assert (
        by_id["test.boom"].status == "error"
        and "RuntimeError: kaboom" in by_id["test.boom"].message
    )
    assert (
        by_id["test.skip"].status == "skipped"
        and by_id["test.skip"].message == "does not apply here"
    )
    assert by_id["test.warn"].status == "fail" and by_id["test.info"].status == "pass"
    assert not any(m.training for m in tiny_gpt.modules())
    assert tiny_gpt.lm_head.weight.requires_grad and tiny_gpt.pos.weight.grad is None
    assert run.summary == {"errors": 0, "warnings": 1, "infos": 1}
    console = Console(record=True, width=120, force_terminal=False)
    render_report(run, target="x.py", console=console)
    text = console.export_text()
    assert "kaboom" in text and "does not apply here" in text and "Warnings (1)" in text


def test_select_checks_rejects_unknown() -> None:
    with pytest.raises(ValueError, match=r"nope\.nope"):
        select_checks(only="nope.nope")
    assert [s.id for s in select_checks(skip=list(CHECKS))] == []


def test_format_evidence_summarises_tables() -> None:
    text = format_evidence({"a": 1.23456789, "table": [{"x": 1}] * 20, "b": None})
    assert text == "a=1.235  table=<20 rows: see --json>  b=None"
    # short nested lists of dicts (per-layer rows) are shown with shortened numbers, not repr
    rows = [{"module": "blocks.0.attn", "peaked": 0.9846311211585999, "logit": None}]
    assert format_evidence({"layers": rows}) == (
        "layers=[{module: blocks.0.attn, peaked: 0.9846, logit: None}]"
    )


def test_json_stdout_stays_json_when_the_file_prints(tmp_path: Path) -> None:
    p = tmp_path / "chatty.py"
    p.write_text(
        "import torch\nfrom torch import nn\nprint('loading my model...')\n"
        "def build_model():\n    print('building')\n"
        "    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))\n"
    )
    res = check(str(p), "--json", "--only", "data,numerics")
    assert json.loads(res.stdout)["summary"]["errors"] == 0
    assert "building" in res.stderr


def test_real_entry_point(models_dir: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tdiag.cli", "check"]
    ok = subprocess.run(
        [*cmd, str(models_dir / "b1_tiny.py"), "--json", "--only", "data"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["target"].endswith("b1_tiny.py")
    bad = subprocess.run([*cmd, "missing.py"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and bad.stdout == ""


def test_runner_restores_buffers(make_ctx, monkeypatch) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.BatchNorm1d(16))
    before = [b.clone() for b in model.buffers()]

    def train_forward(ctx):
        ctx.model.train()
        ctx.model(ctx.input_ids * 0 + 3)  # moves the running statistics
        return []

    monkeypatch.setitem(CHECKS, "test.bn", _spec("test.bn", train_forward))
    run_checks(make_ctx(model), only="test.bn")
    for b, saved in zip(model.buffers(), before, strict=True):
        assert torch.equal(b, saved)
