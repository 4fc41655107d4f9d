"""Every shell and Python block of README.md and docs/*.md runs, so that the docs cannot
drift from the code (the rule is in docs/README.md, "Code blocks are tested").

A fenced block tagged ``python``, ``bash``, ``sh``, ``shell`` or ``console`` runs, in a
temporary folder, unless the comment line(s) right above its fence say otherwise:

- ``<!-- not-run: REASON -->``: not run (a reason is required). Its ``tdiag …`` command
  lines are still parsed by the real CLI (a renamed option fails here), and its
  ``make TARGET`` lines must name a Makefile target;
- ``<!-- run-with: NAME -->``: run after the prelude NAME below, which defines the names
  a sketch leaves to the reader (``model``, ``loader`` …) or writes the files it reads;
- ``<!-- slow: REASON -->``: run only with the slow tests (``make test`` runs them).

Python blocks run in this process (torch is already imported: each costs well under a
second), shell blocks with bash, with this venv's ``bin`` first on PATH. Blocks tagged
otherwise (``json``, ``text``, none) are output samples and are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
MARKERS = {"not-run", "run-with", "slow"}

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<key>[a-z-]+)\s*:\s*(?P<value>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in PYTHON | SHELL and "not-run" not in self.markers


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marker comments right above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = m.group("info").strip().split(" ")[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        markers: dict[str, str] = {}
        k = i - 1
        while k >= 0 and (found := _MARKER.match(lines[k])):
            markers[found.group("key")] = found.group("value")
            k -= 1
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", markers))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]
TAGGED = [b for b in ALL_BLOCKS if b.lang in PYTHON | SHELL]


def _param(block: Block) -> Any:
    marks = [pytest.mark.slow] if "slow" in block.markers else []
    return pytest.param(block, id=block.name, marks=marks)


# -- preludes: what a sketch leaves to the reader ---------------------------------------------


def _tiny_lm() -> Any:
    """A reference Transformer small enough for a doc block, called as ``model(batch)`` with
    an output that has ``.loss`` (as the README's loop expects)."""
    import torch

    from reference_model.config import ModelConfig
    from reference_model.model import Transformer

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = ModelConfig(vocab_size=64, pad_id=0, d_model=32, n_heads=2, n_layers=1,
                              max_seq_len=16)  # fmt: skip
            self.inner = Transformer(cfg)

        def forward(self, batch: torch.Tensor) -> Any:
            return self.inner(batch, labels=batch)

    torch.manual_seed(0)
    return TinyLM()


def prelude_tiny_loop(cwd: Path) -> dict[str, Any]:
    """``model``, ``opt``, ``loader`` (12 batches of ids), ``val_loss``, ``evaluate``,
    ``save_checkpoint``, ``args`` and ``torch``: the names of a training-loop sketch."""
    import argparse

    import torch

    model = _tiny_lm()
    gen = torch.Generator().manual_seed(0)
    loader = [torch.randint(1, 64, (2, 16), generator=gen) for _ in range(12)]
    return {
        "torch": torch,
        "model": model,
        "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "loader": loader,
        "val_loss": 4.0,
        "evaluate": lambda m: 4.0,
        "save_checkpoint": lambda: None,
        "args": argparse.Namespace(lr=1e-3, batch_size=2),
    }


def prelude_tiny_dict_loop(cwd: Path) -> dict[str, Any]:
    """``Monitor``, ``model`` (a reference Transformer: ``model(ids, labels=…).loss``), ``opt``
    and ``loader`` (12 dict batches with ``input_ids`` and ``labels``)."""
    import torch

    from tdiag import Monitor

    model = _tiny_lm().inner
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 64, (2, 16), generator=gen) for _ in range(12)]
    return {
        "torch": torch,
        "Monitor": Monitor,
        "model": model,
        "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "loader": [{"input_ids": x, "labels": x} for x in ids],
    }


def prelude_tiny_ids(cwd: Path) -> dict[str, Any]:
    """``input_ids``, ``mask`` and ``prompt_ids`` for the reference Transformer's defaults."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (2, 16), generator=gen)
    return {"input_ids": ids, "mask": torch.ones_like(ids), "prompt_ids": ids[:1, :4]}


def prelude_model_file(cwd: Path) -> dict[str, Any]:
    """``model.py`` in the folder: a tiny GPT file of the debugger's contract."""
    shutil.copy(ROOT / "tests" / "debug" / "models" / "b1_tiny.py", cwd / "model.py")
    return {}


def prelude_run_folders(cwd: Path) -> dict[str, Any]:
    """``reports/my-run`` and ``reports/demo``: copies of the committed example run (a real
    run of the reference trainer), for the report commands."""
    for name in ("my-run", "demo"):
        shutil.copytree(ROOT / "reports" / "example", cwd / "reports" / name)
    return {}


def prelude_tensorboard_run(cwd: Path) -> dict[str, Any]:
    """``reports/my-run``: a 12-step Monitor run of the tiny loop with TensorBoard on."""
    from tdiag import Monitor

    names = prelude_tiny_loop(cwd)
    model, opt = names["model"], names["opt"]
    with Monitor(model, optimizer=opt, run_dir=cwd / "reports" / "my-run", log_every=4,
                 console=False, system=False, report=False) as mon:  # fmt: skip
        for batch in names["loader"]:
            loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss, tokens=batch.numel())
    return {}


PRELUDES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "tiny-loop": prelude_tiny_loop,
    "tiny-dict-loop": prelude_tiny_dict_loop,
    "tiny-ids": prelude_tiny_ids,
    "model-file": prelude_model_file,
    "run-folders": prelude_run_folders,
    "tensorboard-run": prelude_tensorboard_run,
}


def _prepare(block: Block, cwd: Path) -> dict[str, Any]:
    names: dict[str, Any] = {"__name__": "__docs_block__"}
    for prelude in filter(None, re.split(r"[,\s]+", block.markers.get("run-with", ""))):
        names.update(PRELUDES[prelude](cwd))
    return names


@contextlib.contextmanager
def _in(cwd: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


# -- the rule itself --------------------------------------------------------------------------


def test_blocks_are_found() -> None:
    # a parser that found nothing would make every test below vacuous
    assert len(TAGGED) >= 15
    assert any(b.runs and b.lang in PYTHON for b in TAGGED)
    assert any(b.runs and b.lang in SHELL for b in TAGGED)


def test_markers_are_known_and_say_why() -> None:
    problems = []
    for b in ALL_BLOCKS:
        for key, value in b.markers.items():
            if key not in MARKERS:
                problems.append(f"{b.name}: unknown marker <!-- {key}: … --> ({sorted(MARKERS)})")
            elif key in ("not-run", "slow") and len(value) < 10:
                problems.append(f"{b.name}: <!-- {key}: … --> needs a reason, got {value!r}")
        for prelude in filter(None, re.split(r"[,\s]+", b.markers.get("run-with", ""))):
            if prelude not in PRELUDES:
                problems.append(f"{b.name}: no prelude {prelude!r} (known: {sorted(PRELUDES)})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "block", [_param(b) for b in TAGGED if b.runs and b.lang in PYTHON]
)  # fmt: skip
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    with _in(tmp_path):
        names = _prepare(block, tmp_path)
        code = compile(block.code, block.name, "exec")
        exec(code, names)  # the doc's own code, as a reader would paste it


def _shell_commands(block: Block) -> str:
    if block.lang != "console":
        return block.code
    # a console transcript: the commands are the "$ " lines
    return "\n".join(line[2:] for line in block.code.splitlines() if line.startswith("$ ")) + "\n"


@pytest.mark.parametrize("block", [_param(b) for b in TAGGED if b.runs and b.lang in SHELL])
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    with _in(tmp_path):
        _prepare(block, tmp_path)
    (tmp_path / "reference_model").symlink_to(ROOT / "reference_model")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _shell_commands(block)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{block.name} failed (exit {proc.returncode}):\n{block.code}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


# -- what is not run is still checked ---------------------------------------------------------


def _command_lines(block: Block) -> list[list[str]]:
    """Each command line of a shell block as words (comments, pipes and redirections cut)."""
    out = []
    for line in _shell_commands(block).splitlines():
        line = re.split(r"\s(?:\||>|&&|;)\s", line)[0]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value cmd
            words = words[1:]
        if words:
            out.append(words)
    return out


def _parse_tdiag(args: list[str]) -> None:
    """Parse ``tdiag ARGS`` with the real CLI without running it (unknown options, missing
    arguments and bad values raise)."""
    from typer.main import get_command

    from tdiag.cli import app

    group = get_command(app)
    name, *rest = args  # the docs write `tdiag COMMAND …` (no option before the command)
    ctx = group.make_context("tdiag", [name], resilient_parsing=True)
    command = group.get_command(ctx, name)
    assert command is not None, f"no command `tdiag {name}`"
    command.make_context(name, rest, parent=ctx)


NOT_RUN_SHELL = [b for b in TAGGED if not b.runs and b.lang in SHELL]


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name) for b in NOT_RUN_SHELL])
def test_commands_of_blocks_not_run_still_parse(block: Block) -> None:
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for words in _command_lines(block):
        if words[0] == "tdiag":
            _parse_tdiag(words[1:])
        elif words[0] == "make":
            missing = [w for w in words[1:] if not w.startswith("-") and w not in targets]
            assert not missing, f"{block.name}: no Makefile target {missing}"


def test_the_parse_check_catches_a_renamed_option() -> None:
    _parse_tdiag(["check", "model.py", "--only", "data", "--json"])
    with pytest.raises(Exception, match="--colour"):
        _parse_tdiag(["check", "model.py", "--colour"])
    blocks = parse_blocks_from_text(
        """
        <!-- not-run: a reason long enough -->
        ```bash
        make demo   # comment
        tdiag check my.py --json | python -m json.tool
        ```
        """
    )
    assert [b.markers for b in blocks] == [{"not-run": "a reason long enough"}]
    assert _command_lines(blocks[0]) == [["make", "demo"], ["tdiag", "check", "my.py", "--json"]]


def parse_blocks_from_text(text: str) -> list[Block]:
    import tempfile

    with tempfile.TemporaryDirectory(dir=ROOT / "tests") as tmp:
        path = Path(tmp) / "doc.md"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return parse_blocks(path)
