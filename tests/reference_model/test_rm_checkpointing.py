"""Checkpoints: a file that a weights-only load refuses (a pickle that would run code), a torn
or foreign one, and a good one, through the real command line in a real process."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_rm_train import CHILD_ENV, tiny_cfg  # this folder is on sys.path (rootdir mode)

from reference_model.checkpointing import ResumeError, load_checkpoint
from reference_model.train import train

# the flags of tiny_cfg(), for the command line
TINY = [
    *("--d-model", "32", "--n-heads", "4", "--n-layers", "2", "--max-seq-len", "32"),
    *("--batch-size", "8", "--warmup-steps", "2", "--eval-every", "0", "--eval-batches", "2"),
    *("--data-max-bytes", "300000", "--device", "cpu", "--sample", "0"),
]


class RunsCommand:
    """Unpickling this object runs a shell command (pickle's ``__reduce__``): the classic
    hostile checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reference_model.train", *TINY, *args],
        cwd=cwd,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_a_hostile_checkpoint_is_refused_in_one_line_with_exit_2(tmp_path: Path, how: str):
    """The weights-only load refuses it, nothing in it runs, the file is kept, and the
    trainer says so in one line (exit 2, as for every other bad input), not a traceback."""
    out, marker = tmp_path / "run", tmp_path / "PAYLOAD-RAN"
    out.mkdir()
    evil = {"model": RunsCommand(f"touch {marker}"), "step": 3}
    ckpt = out / "checkpoint.pt"
    if how == "torch.save":
        torch.save(evil, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(evil, protocol=int(how[-1])))
    before = ckpt.read_bytes()
    proc = _trainer("--out-dir", str(out), "--resume", "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot resume from {ckpt}: refused by the weights-only load")
    assert "nothing in it was run" in err
    if how != "pickle protocol 5":  # these name the blocked function; protocol 5 an opcode
        assert "posix.system" in err or "os.system" in err, err
    assert not marker.exists()  # the payload did not run
    assert ckpt.read_bytes() == before  # and the file is kept, untouched


@pytest.mark.slow
def test_a_good_checkpoint_resumes_with_a_plain_line_and_no_stray_info(tmp_path: Path):
    """The case without the fault: the same command resumes a real checkpoint (exit 0), says
    where from in a plain line, and prints no ``INFO:`` logging records (tdiag's included)."""
    out = tmp_path / "run"
    first = _trainer("--out-dir", str(out), "--steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = _trainer("--out-dir", str(out), "--resume", "--steps", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 2\n" in proc.stderr
    both = first.stdout + first.stderr + proc.stdout + proc.stderr
    assert "INFO:" not in both and "Traceback" not in both
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_load_checkpoint_refuses_torn_foreign_and_hostile_files(tmp_path: Path):
    train(tiny_cfg(steps=1, out_dir=str(tmp_path / "good")))
    good = tmp_path / "good" / "checkpoint.pt"
    assert load_checkpoint(good)["step"] == 1
    cases = {
        "torn": (good.read_bytes()[:200], "not a readable checkpoint"),
        "garbage": (b"\x00\x01 not a checkpoint " * 8, "refused by the weights-only load"),
        "foreign": (None, "missing model, optimizer"),
        "hostile": (pickle.dumps(RunsCommand("true"), protocol=2), "GLOBAL posix.system"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        if data is None:
            torch.save({"weights": torch.zeros(2)}, path)  # a torch file, not this trainer's
        else:
            path.write_bytes(data)
        with pytest.raises(ResumeError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name


def test_resume_refuses_a_hostile_checkpoint_before_changing_anything(tmp_path: Path):
    """train(resume=True) raises ResumeError (a ValueError: main() turns it into exit 2)."""
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps(RunsCommand("true"), protocol=2))
    with pytest.raises(ResumeError, match="weights-only"):
        train(tiny_cfg(steps=1, out_dir=str(tmp_path), resume=True))
    assert issubclass(ResumeError, ValueError)
