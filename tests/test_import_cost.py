"""`import tdiag` stays cheap: heavy libraries load only when a command or a report needs
them (issue 11: at most 0.3 s beyond `import torch`; the figure is in docs/performance.md,
from bench/bench_import.py). Behavioural: which modules a fresh interpreter has loaded,
never a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Loaded by the report, the CLI or optional sinks only.
REPORT_ONLY = ("pandas", "matplotlib", "jinja2", "markupsafe", "tensorboard", "scipy", "typer")


def _loaded(code: str, names: tuple[str, ...]) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({names!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_tdiag_loads_no_heavy_library():
    assert _loaded("import tdiag", (*REPORT_ONLY, "torch", "rich", "psutil", "numpy")) == []


@pytest.mark.parametrize(
    "code",
    [
        "from tdiag import Monitor",
        "import tdiag.monitor",
        "from tdiag.history import HistoryWriter, read_history, ReadStats, HISTORY_FILE",
    ],
)
def test_the_monitor_and_the_history_writer_load_no_report_library(code):
    assert _loaded(code, REPORT_ONLY) == []


def test_the_history_reader_still_works_after_a_lazy_import(tmp_path):
    """The names are there; pandas comes when a history is read."""
    (tmp_path / "history.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    code = (
        "import sys\nfrom tdiag.history import read_history\n"
        "assert 'pandas' not in sys.modules\n"
        f"df, st = read_history({str(tmp_path)!r})\n"
        "assert 'pandas' in sys.modules and list(df['train/loss']) == [2.0]"
    )
    assert _loaded(code, ("pandas",)) == ["pandas"]
