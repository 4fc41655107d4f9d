"""Packaging: the folder reference_model/ installs as ``tdiag.reference_model`` (no generic
top-level name in a user's environment), and tdiag's own commands work from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_folder_of_tdiag_is_a_listed_package() -> None:
    """packages.find cannot see a package mapped to another folder, so the list is explicit:
    a new folder of tdiag/ with Python files must be added to it (or the wheel lacks it)."""
    cfg = _setuptools_config()
    assert cfg["package-dir"] == {"tdiag.reference_model": "reference_model"}
    listed = set(cfg["packages"])
    assert "tdiag.reference_model" in listed
    assert not any(p == "reference_model" or p.startswith("reference_model.") for p in listed)
    on_disk = {
        ".".join(Path(folder).relative_to(REPO).parts)
        for folder, dirs, files in os.walk(REPO / "tdiag")  # links (tdiag/docs) not followed
        if "__pycache__" not in Path(folder).parts and any(f.endswith(".py") for f in files)
    }
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    stale = sorted(listed - on_disk - {"tdiag.reference_model"})
    assert not stale, f"{stale} listed in pyproject.toml but not on disk"


def _copy_sources(dst: Path) -> None:
    """What a wheel build reads, copied (building in the checkout would leave build/ there)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tdiag", "reference_model", "docs"):
        shutil.copytree(REPO / name, dst / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)


@pytest.mark.slow
def test_the_wheel_ships_tdiag_reference_model_and_tdiag_demo_uses_it(tmp_path: Path) -> None:
    src, whl, site = tmp_path / "src", tmp_path / "whl", tmp_path / "site"
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-deps", "--no-index", "--no-build-isolation"]
    subprocess.run([*pip, "wheel", str(src), *offline, "-w", str(whl)], check=True, timeout=300)
    (wheel,) = whl.glob("tdiag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("reference_model/")], "a top-level package"
    sources = sorted(p.name for p in (REPO / "reference_model").glob("*.py"))
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("tdiag/reference_model/"))
    assert shipped == sources

    subprocess.run([*pip, "install", *offline, "--target", str(site), str(wheel)], check=True)
    # a user's process, away from the checkout: tdiag and its reference model from the wheel
    code = (
        "import sys; from tdiag.cli import main; "
        "sys.argv = ['tdiag', 'demo', '--steps', '2', '--quiet', '--device', 'cpu', "
        f"'--out', {str(tmp_path / 'demo')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "import tdiag.reference_model.train as t\n"
        "print(code, t.__file__, 'reference_model' in sys.modules)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, path, fell_back = proc.stdout.split()[-3:]
    assert code == "0" and Path(path) == site / "tdiag" / "reference_model" / "train.py"
    assert fell_back == "False"  # tdiag imported tdiag.reference_model, not a top-level name
    assert (tmp_path / "demo" / "history.jsonl").exists()
    helped = subprocess.run(
        [sys.executable, "-m", "tdiag.reference_model.train", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "python -m tdiag.reference_model.train" in helped.stdout
