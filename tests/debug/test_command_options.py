"""`tdiag check` options as a new user meets them: --help, --seq-len beyond the model's
positions, options a file's own batch makes unused, unwrapped output in a pipe, and a
--timeout message that says where the time went."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug.results import CheckResult
from tdiag.debug.worker import CheckJob, _time_spent, _Watch


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def one_line(text: str) -> str:
    return " ".join(text.split())


POS_TABLE_ONLY = '''
import torch
from torch import nn


class M(nn.Module):
    """No config: the context length is only in the shape of the position table."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.pos = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))


def build_model():
    return M()
'''


def test_help_has_no_type_tags_on_flags_and_names_the_argument() -> None:
    res = CliRunner().invoke(app, ["check", "--help"], terminal_width=120)
    assert res.exit_code == 0
    out = res.stdout
    assert "<bool>" not in out and "{target}" not in out
    assert "Usage: tdiag check [OPTIONS] PATH.py[:FACTORY]" in out
    assert "cuda:N" in out  # --device
    assert "families" in out and "grad.*" in out  # --only
    assert "<int>" in out  # options that take a value keep their type


def test_seq_len_beyond_the_position_table_is_a_clear_error(tmp_path: Path) -> None:
    model = tmp_path / "pos_model.py"
    model.write_text(POS_TABLE_ONLY)
    res = check(str(model), "--seq-len", "100000", "--only", "data")
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    err = one_line(res.stderr)
    assert "--seq-len 100000 is longer than the model in pos_model.py can take" in err
    assert "position table (or causal-mask buffer) has 64 rows" in err
    assert "IndexError" not in res.stderr and "Traceback" not in res.stderr
    ok = check(str(model), "--seq-len", "64", "--only", "data")  # at the capacity: runs
    assert ok.exit_code == 0, ok.stderr


def test_seq_len_beyond_the_config_is_a_clear_json_error(models_dir: Path) -> None:
    res = check(str(models_dir / "b2_nanogpt.py"), "--seq-len", "100000", "--json")
    assert res.exit_code == 2
    obj = json.loads(res.stdout)
    assert obj["error"]["cause"] == "bad-option"
    assert "its config says 16" in obj["error"]["message"]


def test_seq_len_with_the_files_own_batch_is_said_to_be_unused(models_dir: Path) -> None:
    res = check(str(models_dir / "b1_tiny.py"), "--seq-len", "8", "--only", "data")
    assert res.exit_code == 0, res.stderr
    assert "--seq-len not used: the file defines its own batch" in one_line(res.stderr)
    res = check(str(models_dir / "b1_tiny.py"), "--json", "--only", "data")
    assert "notes" not in json.loads(res.stdout)  # nothing to say without the option
    res = check(str(models_dir / "b1_tiny.py"), "--json", "--batch-size", "2", "--only", "data")
    (note,) = json.loads(res.stdout)["notes"]
    assert note.startswith("--batch-size not used")


def test_report_is_not_wrapped_at_80_columns_in_a_pipe(tmp_path: Path) -> None:
    # a long path: rich would split it over lines at 80 columns when it writes to a pipe
    deep = tmp_path / ("a_rather_long_folder_name_" * 4)
    deep.mkdir()
    model = deep / "pos_model.py"
    model.write_text(POS_TABLE_ONLY)
    res = check(str(model), "--only", "data")
    assert res.exit_code == 0, res.stderr
    assert len(str(model)) > 100
    assert f"tdiag check {model}" in res.stdout.splitlines()  # the header line, whole


def _watch(results: list[CheckResult], running: str, running_for: float) -> _Watch:
    watch = _Watch(CheckJob(target="m.py", timeout=100.0), lambda text: None)
    watch.ready_at, watch.loaded_at = 0.0, 12.0
    watch.ids = [r.id for r in results] + [running]
    watch.results = results
    watch.meta = {"batch_shape": (4, 16384)}
    watch.running = running
    return watch


def test_timeout_message_says_where_the_time_went_without_guessing_a_hang(monkeypatch) -> None:
    import tdiag.debug.worker as worker

    monkeypatch.setattr(worker.time, "monotonic", lambda: 100.0)
    slow = [CheckResult(f"c{i}", "pass", 10.0 + i) for i in range(6)]  # 75 s in all
    watch = _watch(slow, "grad.exploding", running_for=0.0)
    watch.running_since = 88.0  # ran 12 s of the 100 s
    text = _time_spent(watch)
    assert "loading took 12.0 s" in text
    assert "6 finished check(s) 75.0 s (slowest: c5 15.0 s, c4 14.0 s, c3 13.0 s)" in text
    assert "grad.exploding 12.0 s until stopped" in text
    assert "slow at this size (batch (4, 16384)), no single check hung" in text
    assert "never returns" not in text

    fast = [CheckResult("c0", "pass", 0.5)]
    watch = _watch(fast, "kvcache.mismatch", running_for=0.0)
    watch.running_since = 30.0  # ran 70 s of the 100 s on its own
    text = _time_spent(watch)
    assert "kvcache.mismatch ran 70.0 s on its own: a forward pass (or decode) that never" in text
    assert "--skip kvcache.mismatch" in text


def test_timeout_end_to_end_names_the_running_check(tmp_path: Path) -> None:
    model = tmp_path / "slow_model.py"
    model.write_text(
        textwrap.dedent(
            """
            import time
            from torch import nn

            class M(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.tok = nn.Embedding(20, 8)
                    self.head = nn.Linear(8, 20)

                def forward(self, ids):
                    time.sleep(0.8)  # every forward is slow: no single check hangs
                    return self.head(self.tok(ids))

            def build_model():
                return M()
            """
        )
    )
    res = check(str(model), "--timeout", "3", "--only", "init,numerics,gradients")
    assert res.exit_code == 2
    err = one_line(res.stderr)
    assert "stopped after 3 s (--timeout) while" in err
    assert "Time spent: loading took" in err
    # the report's last line does not read as a complete run "in N s" next to the timeout
    assert "of checks (loading not counted; stopped: see below)" in one_line(res.stdout)
    assert "incomplete" in res.stdout
