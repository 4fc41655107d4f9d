"""``--timeout`` in the middle of the checks keeps the finished checks' results (exit code 2)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug import CHECKS
from tdiag.debug.runner import NOT_RUN_REASON

HANG = "kvcache.mismatch"  # hang_kvcache.py's decode_with_cache never returns


def _check(path: Path, *args: str):
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["check", str(path), "--timeout", "3", *args])
    return result, time.perf_counter() - t0


def test_timeout_keeps_finished_checks_json(models_dir: Path) -> None:
    result, seconds = _check(models_dir / "hang_kvcache.py", "--json")
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout)
    assert seconds < 10
    out = json.loads(result.stdout)  # stdout is still one JSON object
    status = {c["id"]: c for c in out["checks"]}
    ids = list(CHECKS)
    hung = ids.index(HANG)
    assert [c["id"] for c in out["checks"]] == ids
    before = [status[i]["status"] for i in ids[:hung]]
    assert before.count("pass") >= 10 and set(before) <= {"pass", "skipped"}, before
    for i in ids[:hung]:  # the early checks ran for real: none was cut short
        assert status[i].get("reason") != NOT_RUN_REASON
    assert status[HANG]["status"] == "error"
    assert status[HANG]["reason"].startswith("timed out after 3 s")
    after = ids[hung + 1 :]
    assert after, "the hanging check must not be the last one for this test"
    for i in after:
        assert status[i] == {"id": i, "status": "skipped", "seconds": 0.0, "reason": NOT_RUN_REASON}
    assert out["timed_out"] == {"check": HANG, "seconds": 3.0}
    # b1_tiny gives an info finding in an early check: the finished checks' findings are kept
    assert out["findings"] and out["summary"]["infos"] == len(out["findings"])
    err = result.stderr
    assert "stopped after 3 s (--timeout) while running check kvcache.mismatch" in err
    assert "hang_kvcache.py" in err and "in decode_with_cache" in err  # where it hung
    assert "Traceback (most recent call last)" not in err


def test_timeout_renders_statuses(models_dir: Path) -> None:
    text, _ = _check(models_dir / "hang_kvcache.py")
    assert text.exit_code == 2
    assert "timed out after 3 s" in text.stdout and NOT_RUN_REASON in text.stdout


def test_no_timeout_reached_is_unchanged(models_dir: Path) -> None:
    result, _ = _check(models_dir / "hang_kvcache.py", "--json", "--skip", HANG)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert "timed_out" not in out
    assert not [c for c in out["checks"] if c["status"] == "error"]
