"""`tdiag explain ID`: every Finding's docs link resolves, in a checkout and in an installed
wheel (the docs ship as package data, tdiag/docs/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.explain import UnknownId, checks_doc_path, find_section, sections
from tdiag.findings import Finding, Severity

ROOT = Path(__file__).parents[1]


def explain(*args: str):
    return CliRunner().invoke(app, ["explain", *args])


def _emitted_ids() -> list[str]:
    import tdiag.report.rules  # noqa: F401  (registers the rules)
    from tdiag.debug import CHECKS
    from tdiag.report.rules.registry import RULES

    return [*CHECKS, *RULES]


def test_every_check_and_rule_id_resolves_by_id_anchor_and_docs_field() -> None:
    text = checks_doc_path().read_text(encoding="utf-8")
    ids = _emitted_ids()
    assert len(ids) > 30
    for finding_id in ids:
        docs = Finding(id=finding_id, severity=Severity.INFO, title="t").docs  # the field
        by_id, by_docs = find_section(finding_id, text), find_section(docs, text)
        assert by_id == by_docs == find_section(docs.split("#")[1], text)
        assert by_id.text.startswith(f"### `{finding_id}`"), finding_id


def test_a_section_ends_at_the_next_anchor() -> None:
    section = find_section("grad.exploding")
    assert "GRAD_NORM_EXPLODING" in section.text
    assert "### `grad.vanishing`" not in section.text and '<a id="' not in section.text


def test_cli_prints_the_section_and_where_it_is(tmp_path: Path) -> None:
    res = explain("docs/checks.md#grad-exploding")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("### `grad.exploding`")  # Markdown as is: not a terminal
    assert "(docs/checks.md#grad-exploding; file:" in res.stdout


def test_unknown_id_is_exit_2_with_suggestions() -> None:
    res = explain("grad.explode")
    assert res.exit_code == 2 and res.stdout == ""
    err = " ".join(res.stderr.split())
    assert "no Finding id 'grad.explode' in docs/checks.md" in err
    assert "Did you mean: grad.exploding" in err and "tdiag explain --list" in err
    with pytest.raises(UnknownId) as info:
        find_section("numerics")  # a family: the ids that contain it are suggested
    assert info.value.suggestions and all("numerics" in s for s in info.value.suggestions)


def test_list_prints_every_documented_id_once() -> None:
    res = explain("--list")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert len(lines) == len(set(lines))
    listed = [line.split()[0] for line in lines]
    assert set(_emitted_ids()) <= set(listed)
    text = checks_doc_path().read_text(encoding="utf-8")
    assert listed == [s.id for s in sections(text)]
    # an id documented twice (a check and a rule of the same id) is listed with its anchors
    assert "data.label-leak  (#data-label-leak-report)" in lines
    both = explain("data.label-leak")
    assert both.stdout.startswith("### `data.label-leak`\n")
    assert "Also documented: tdiag explain data-label-leak-report" in both.stdout


def test_the_debuggers_report_points_at_tdiag_explain(models_dir_b1: Path) -> None:
    res = CliRunner().invoke(app, ["check", str(models_dir_b1), "--only", "data"])
    assert res.exit_code == 1, res.stderr
    assert "more: tdiag explain data.token-out-of-range" in res.stdout


@pytest.fixture
def models_dir_b1() -> Path:
    return ROOT / "tests" / "debug" / "models" / "b1_oob_tokens.py"


def test_package_docs_are_the_repository_docs() -> None:
    # tdiag/docs is a link to docs/: one copy of the text, shipped as package data
    assert (ROOT / "tdiag" / "docs").resolve() == (ROOT / "docs").resolve()
    assert checks_doc_path().resolve() == (ROOT / "docs" / "checks.md").resolve()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"docs/*.md"' in pyproject


@pytest.mark.slow
def test_the_wheel_ships_the_docs(tmp_path: Path) -> None:
    """Build the wheel (no network: the build backend of this venv) and look inside."""
    src, out = tmp_path / "src", tmp_path / "wheel"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("tdiag", "reference_model", "docs"):  # symlinks kept: tdiag/docs -> ../docs
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(  # built in the copy: nothing is written into the checkout
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("tdiag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tdiag/docs/checks.md" in names and "tdiag/explain.py" in names
