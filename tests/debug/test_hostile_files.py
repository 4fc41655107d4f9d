"""`tdiag check` on hostile model files: a model on the meta device, a file that ends the
process (``os._exit``), a forward that defeats an in-process ``--timeout``; each is exit
code 2 with a message naming the cause, in the report and in ``--json``.

The five files of tests/debug/models/hostile_*.py run through the real entry point
(``python -m tdiag.cli check``); the rest through typer's runner, which is quicker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug.results import NOT_RUN_REASON
from tdiag.debug.usercode import where_stuck_in_dump
from tdiag.debug.worker import start_method

#: The run ends this long after --timeout at most: the child's start-up (importing torch,
#: which --timeout does not count: ~3 s on a busy 2-core machine) and the kill's grace.
SLACK_S = 12.0


def tdiag_check(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "tdiag.cli", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res, time.monotonic() - t0


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


def json_error(stdout: str) -> dict:
    obj = json.loads(stdout)  # stdout is one JSON object, nothing else
    assert set(obj["error"]) == {"cause", "message", "traceback"}
    return obj


def test_meta_device(models_dir: Path) -> None:
    path = str(models_dir / "hostile_meta_device.py")
    res, _ = tdiag_check(path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = one_line(res.stderr)
    assert "the model's parameters are on the meta device: they have no values" in err
    assert "build it on cpu, or materialise it with to_empty() + init / load_state_dict" in err
    assert "Traceback (most recent call last)" not in res.stderr and res.stdout == ""

    res, _ = tdiag_check(path, "--json")
    assert res.returncode == 2
    obj = json_error(res.stdout)
    assert set(obj) == {"tdiag_version", "target", "error"} and obj["target"] == path
    assert obj["error"]["cause"] == "meta-device"
    assert "on the meta device" in obj["error"]["message"]
    assert "on the meta device" in res.stderr  # the same message for a person


def test_os_exit_at_import(models_dir: Path) -> None:
    res, _ = tdiag_check(str(models_dir / "hostile_os_exit_import.py"), "--json")
    assert res.returncode == 2, (res.returncode, res.stderr)
    obj = json_error(res.stdout)
    assert obj["error"]["cause"] == "process-ended"
    message = obj["error"]["message"]
    assert message.startswith(
        "the model file ended the process (os._exit(0)) while importing "
        "hostile_os_exit_import.py; tdiag could not check it."
    )
    assert message in one_line(res.stderr)


def test_os_exit_in_forward_keeps_the_finished_checks(models_dir: Path) -> None:
    res, _ = tdiag_check(str(models_dir / "hostile_os_exit_forward.py"), "--json")
    assert res.returncode == 2, (res.returncode, res.stderr)
    obj = json.loads(res.stdout)
    assert obj["error"]["cause"] == "process-ended"
    statuses = [c["status"] for c in obj["checks"]]
    stopped = statuses.index("error")  # the check whose forward ended the process
    running = obj["checks"][stopped]
    assert set(statuses[:stopped]) <= {"pass", "skipped"} and "pass" in statuses[:stopped]
    assert running["reason"].startswith("the model file ended the process (os._exit(0)) after")
    for c in obj["checks"][stopped + 1 :]:
        assert c["status"] == "skipped" and c["reason"] == "not run: the check process ended"
    err = one_line(res.stderr)
    assert f"(os._exit(0)) while running check {running['id']} (it had run" in err
    assert re.search(r"could not check it fully \(\d+ check\(s\) finished and are reported", err)


def test_forward_that_ignores_sigalrm_is_stopped(models_dir: Path) -> None:
    res, seconds = tdiag_check(str(models_dir / "hostile_ignores_alarm.py"), "--timeout", "2")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert seconds < 2 + SLACK_S, seconds
    err = one_line(res.stderr)
    assert "stopped after 2 s (--timeout) while running the model's first forward pass" in err
    assert "hostile_ignores_alarm.py" in err and "in forward" in err  # where it was looping
    assert "site-packages" not in err and "tdiag/" not in err
    assert res.stdout == ""  # a timeout while loading: nothing was checked


def test_forward_that_catches_baseexception_is_stopped(models_dir: Path) -> None:
    path = str(models_dir / "hostile_catches_baseexception.py")
    res, seconds = tdiag_check(path, "--timeout", "2", "--json")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert seconds < 2 + SLACK_S, seconds
    obj = json.loads(res.stdout)
    hung = obj["timed_out"]["check"]
    assert obj["timed_out"] == {"check": hung, "seconds": 2.0} and hung is not None
    assert obj["error"]["cause"] == "timeout"
    by_id = {c["id"]: c for c in obj["checks"]}
    assert by_id[hung]["status"] == "error"
    assert by_id[hung]["reason"].startswith("timed out after 2 s (--timeout; this check ran")
    assert 1.0 < by_id[hung]["seconds"] < 2 + SLACK_S  # how long the stopped check ran
    ids = list(by_id)
    assert {by_id[i]["status"] for i in ids[: ids.index(hung)]} <= {"pass", "skipped"}
    assert all(by_id[i]["reason"] == NOT_RUN_REASON for i in ids[ids.index(hung) + 1 :])
    err = one_line(res.stderr)
    assert f"stopped after 2 s (--timeout) while running check {hung} (it had run" in err
    assert "hostile_catches_baseexception.py" in err and "in forward" in err


# -- more ways to end the process, through typer's runner --------------------------------------

LM = """
import torch
from torch import nn

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32)
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        if self.calls > 1:
            {fault}
        return self.head(self.embed(input_ids))

def build_model():
    return LM()
"""


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args])


def test_sys_exit_in_a_check_is_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "exits.py"
    p.write_text(LM.replace("{fault}", "raise SystemExit(3)"))
    res = check(str(p), "--only", "numerics,gradients")
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    err = one_line(res.stderr)
    assert "the model file called sys.exit(3) while running check" in err
    assert "exits.py" in err and "in forward" in err  # the user's frame
    assert "numerics.nonfinite-param" in res.stdout  # the report of the finished checks


@pytest.mark.skipif(not hasattr(signal, "SIGSEGV") or os.name != "posix", reason="POSIX")
def test_native_crash_is_exit_2_with_where(tmp_path: Path) -> None:
    p = tmp_path / "crashes.py"
    p.write_text(LM.replace("{fault}", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    res = check(str(p), "--only", "numerics", "--json")
    assert res.exit_code == 2
    obj = json.loads(res.stdout)
    assert obj["error"]["cause"] == "process-killed"
    assert "killed by SIGSEGV while running check" in obj["error"]["message"]
    assert "crashes.py" in obj["error"]["traceback"] and "in forward" in obj["error"]["traceback"]


def test_json_error_object_for_every_exit_2(tmp_path: Path) -> None:
    res = check(str(tmp_path / "missing.py"), "--json")
    assert res.exit_code == 2
    assert json_error(res.stdout)["error"]["cause"] == "missing-file"
    res = check(str(tmp_path / "missing.py"), "--json", "--only", "nope.nope")
    assert res.exit_code == 2
    assert json_error(res.stdout)["error"]["cause"] == "bad-option"
    assert "unknown check id(s): nope.nope" in res.stderr


def test_prints_of_the_file_reach_the_parent(tmp_path: Path) -> None:
    p = tmp_path / "chatty.py"
    p.write_text(LM.replace("{fault}", "pass") + "\nprint('hello from the model file')\n")
    res = check(str(p), "--only", "numerics.nonfinite-param")
    assert res.exit_code == 0, res.stderr
    assert "hello from the model file" in res.stdout
    res = check(str(p), "--only", "numerics.nonfinite-param", "--json")
    assert "hello from the model file" in res.stderr and json.loads(res.stdout)


# -- the parts -----------------------------------------------------------------------------------


def test_parent_side_is_torch_free() -> None:
    # the child is forked before torch is imported: torch is imported once, by the child
    code = (
        "import sys, tdiag.cli, tdiag.debug.command, tdiag.debug.worker, tdiag.debug.child, "
        "tdiag.debug.render; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_start_method(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdiag.debug import worker

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(worker, "_one_thread", lambda: True)
    assert start_method("cpu") == "fork"
    assert start_method("cuda") == "forkserver"  # torch is imported here: it may know CUDA
    monkeypatch.setattr(worker, "_one_thread", lambda: False)  # e.g. OpenMP's pool is up
    assert start_method("cpu") == "forkserver"
    for platform in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", platform)
        assert start_method("cpu") == "spawn"


def test_where_stuck_in_dump(tmp_path: Path) -> None:
    user = tmp_path / "model.py"
    user.write_text("def forward():\n    while True:\n        pass\n")
    dump = (
        "Timeout (0:00:02)!\n"
        "Thread 0x00000000000000aa (most recent call first):\n"
        f'  File "{tmp_path}/other_thread.py", line 1 in run\n'
        "Thread 0x00000000000000bb (most recent call first):\n"
        f'  File "{user}", line 3 in forward\n'
        '  File "/x/site-packages/torch/nn/modules/module.py", line 1 in _call_impl\n'
        f'  File "{user}", line 1 in <module>\n'
    )
    text = where_stuck_in_dump(dump, 0xBB, user)
    assert text.startswith("Where it was running (your code only):")
    assert text.index("in <module>") < text.index("in forward")  # most recent call last
    assert "site-packages" not in text and "other_thread" not in text
    assert "\n    pass" in text  # the source line
    assert where_stuck_in_dump(dump, 0xCC, user) == ""


def test_partly_meta_model_names_a_meta_tensor(tmp_path: Path) -> None:
    from tdiag.loading import LoadError, load_target

    p = tmp_path / "partly_meta.py"
    p.write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n"
        "    m = nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 16))\n"
        "    m[1].register_buffer('scale', torch.empty(16, device='meta'))\n"
        "    return m\n"
    )
    with pytest.raises(LoadError) as err:
        load_target(str(p))
    assert err.value.cause == "meta-device"
    assert "(1 of its 4 parameters and buffers, e.g. 1.scale)" in err.value.message


def test_model_that_cannot_be_moved(tmp_path: Path) -> None:
    from tdiag.loading import LoadError, load_target

    p = tmp_path / "immovable.py"
    p.write_text(
        "from torch import nn\n"
        "class M(nn.Sequential):\n"
        "    def to(self, *args, **kwargs):\n"
        "        raise RuntimeError('out of memory (pretend)')\n"
        "def build_model():\n"
        "    return M(nn.Embedding(16, 4), nn.Linear(4, 16))\n"
    )
    with pytest.raises(LoadError) as err:
        load_target(str(p))
    assert err.value.cause == "to-device"
    assert err.value.message == (
        "cannot move the model of immovable.py to cpu: RuntimeError: out of memory (pretend)."
    )
    assert "immovable.py" in err.value.user_traceback and "in to" in err.value.user_traceback


def test_batch_on_the_meta_device(tmp_path: Path) -> None:
    p = tmp_path / "meta_batch.py"
    p.write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n    return nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 16))\n"
        "def get_batch():\n    return torch.zeros(2, 8, dtype=torch.long, device='meta')\n"
    )
    res = check(str(p), "--json")
    assert res.exit_code == 2
    error = json_error(res.stdout)["error"]
    assert error["cause"] == "bad-batch"
    assert error["message"] == (
        "bad batch: input_ids from get_batch() in meta_batch.py are on the meta device: they "
        "have no values; return tensors on cpu (or the model's device)."
    )
