"""Loading a user's file (Contract 1): every bad input -> exit 2, a message naming the cause and
only the user's frames; and the conventions (factories, batches, CAUSAL, random batch)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.loading import DEFAULT_SEQ_LEN, LoadError, load_target, parse_target

MODEL = """
import torch
from torch import nn

class M(nn.Module):
    def __init__(self, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))
"""


def write(tmp_path: Path, body: str, name: str = "user_model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run_check(*args: str):
    return CliRunner().invoke(app, ["check", *args, "--only", "data"])


def assert_exit2(result, *needles: str) -> str:
    out = result.stderr
    assert result.exit_code == 2, (result.exit_code, out, result.stdout)
    for n in needles:
        assert n in out, (n, out)
    assert "Traceback (most recent call last)" not in out  # never a raw traceback
    assert "tdiag/loading.py" not in out and "site-packages" not in out  # user frames only
    assert result.stdout == ""
    return out


def test_missing_file(tmp_path: Path) -> None:
    assert_exit2(run_check(str(tmp_path / "nope.py")), "does not exist")


def test_not_python(tmp_path: Path) -> None:
    assert_exit2(run_check(str(tmp_path)), "expected a Python file")


def test_syntax_error(tmp_path: Path) -> None:
    p = write(tmp_path, "def build_model(:\n    pass\n")
    assert_exit2(run_check(str(p)), "syntax error", "line 1", "user_model.py")


def test_import_error_inside_file(tmp_path: Path) -> None:
    p = write(tmp_path, "import torch\nimport tdiag_no_such_package_xyz\n")
    out = assert_exit2(run_check(str(p)), "import inside it failed", "tdiag_no_such_package_xyz")
    assert 'user_model.py", line 2' in out


def test_no_factory(tmp_path: Path) -> None:
    p = write(tmp_path, "x = 1\n")
    assert_exit2(run_check(str(p)), "found no model", "build_model()")


def test_named_factory_missing(tmp_path: Path) -> None:
    p = write(tmp_path, MODEL + "\ndef build_model():\n    return M()\n")
    assert_exit2(run_check(f"{p}:make_it"), "no callable 'make_it'")


def test_factory_raises_shows_user_frames(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
def helper(width):
    raise ValueError(f"width {width} not supported")

def build_model():
    return helper(7)
""",
    )
    out = assert_exit2(run_check(str(p)), "build_model() in user_model.py raised", "width 7")
    assert "in helper" in out and "in build_model" in out


def test_factory_returns_non_module(tmp_path: Path) -> None:
    p = write(tmp_path, "def build_model():\n    return {'model': 1}\n")
    assert_exit2(run_check(str(p)), "returned dict, not a torch.nn.Module")


def test_forward_raises(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
class Broken(M):
    def forward(self, input_ids):
        h = self.embed(input_ids)
        return h @ torch.ones(3, 3)  # shape bug

def build_model():
    return Broken()
""",
    )
    out = assert_exit2(run_check(str(p)), "forward pass raised RuntimeError", "model(input_ids)")
    assert "return h @ torch.ones(3, 3)" in out


def test_output_of_unexpected_shape(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
class Pooled(M):
    def forward(self, input_ids):
        return super().forward(input_ids).mean(dim=1)  # (B, V): no sequence axis

def build_model():
    return Pooled()
""",
    )
    assert_exit2(run_check(str(p)), "unexpected output", "expected logits of shape (B, L, V)")


def test_output_without_logits(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
class Str(M):
    def forward(self, input_ids):
        return "hello"

def build_model():
    return Str()
""",
    )
    assert_exit2(run_check(str(p)), "holds no logits")


def test_float_batch(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + "\ndef build_model():\n    return M()\n\ndef get_batch():\n    return torch.rand(2, 8) * 30\n",
    )
    assert_exit2(run_check(str(p)), "dtype torch.float32", "integers")


def test_batch_function_raises(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + "\ndef build_model():\n    return M()\n\ndef get_batch():\n    return open('/nonexistent/data.bin')\n",
    )
    assert_exit2(run_check(str(p)), "get_batch() in user_model.py raised FileNotFoundError")


def test_timeout_stops_endless_forward(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
class Forever(M):
    def forward(self, input_ids):
        n = 0
        while True:
            try:
                n += 1
            except Exception:  # a user's broad except must not swallow the timeout
                pass

def build_model():
    return Forever()
""",
    )
    out = assert_exit2(run_check(str(p), "--timeout", "1"), "stopped after 1 s", "--timeout")
    assert "user_model.py" in out and "in forward" in out


# -- what loads, and how -------------------------------------------------------------------


def test_parse_target() -> None:
    assert parse_target("a/b.py:make") == (Path("a/b.py"), "make")
    assert parse_target("a/b.py") == (Path("a/b.py"), None)


def test_module_level_model_and_random_batch(tmp_path: Path) -> None:
    p = write(tmp_path, MODEL + "\nmodel = M(vocab=40)\nCAUSAL = False\n")
    ctx = load_target(str(p), seed=3)
    assert ctx.factory is None and ctx.causal is False and not ctx.batch_from_file
    assert ctx.input_ids.shape == (4, DEFAULT_SEQ_LEN)
    assert int(ctx.input_ids.max()) < 40 and ctx.vocab_size == 40
    again = load_target(str(p), seed=3)
    assert torch.equal(ctx.input_ids, again.input_ids)  # --seed makes it repeatable


def test_factory_order_and_seq_len_from_config(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
class Cfg:
    vocab_size = 32
    block_size = 24

def get_model():
    m = M()
    m.config = Cfg()
    return m

def create_model():
    raise AssertionError("get_model comes first")
""",
    )
    ctx = load_target(str(p), batch_size=3)
    assert ctx.input_ids.shape == (3, 24)
    ctx = load_target(str(p), seq_len=5)
    assert ctx.input_ids.shape[1] == 5


def test_explicit_factory_and_file_functions(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        MODEL
        + """
def small():
    return M(vocab=20)

def make_batch():
    return {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": torch.zeros(2, 6, dtype=torch.long)}

def loss_fn(model, batch):
    return model(batch["input_ids"]).sum() * 0

def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)

def decode_with_cache(model, input_ids):
    return model(input_ids)
""",
    )
    with pytest.raises(LoadError) as err:
        load_target(str(p))  # small() is not a default factory name
    assert err.value.cause == "no-factory"
    ctx = load_target(f"{p}:small", no_causal=True)
    assert ctx.vocab_size == 20 and ctx.batch_style == "dict" and ctx.batch_from_file
    assert ctx.causal is False
    assert ctx.loss().item() == 0.0  # the file's loss_fn is used
    assert ctx.make_optimizer is not None and ctx.decode_with_cache is not None


def test_relative_import_in_package(tmp_path: Path) -> None:
    pkg = tmp_path / "b1pkg_rel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(textwrap.dedent(MODEL))
    (pkg / "model.py").write_text("from .layers import M\n\ndef build_model():\n    return M()\n")
    ctx = load_target(str(pkg / "model.py"))
    assert type(ctx.model).__name__ == "M"


def test_token_out_of_range_blocks_forward(models_dir: Path) -> None:
    ctx = load_target(str(models_dir / "b1_oob_tokens.py"))
    assert "outside [0, 64)" in ctx.cache["blocked"]


def test_deadline_restores_an_enclosing_timer() -> None:
    import signal

    from tdiag.loading import deadline

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with deadline(5.0):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_tdiag_frames_are_never_the_users() -> None:
    # a model file at the repository root has tdiag/ below its folder: still not user code
    from tdiag.debug import usercode

    root = Path(usercode.__file__).resolve().parents[2]
    for mod in ("tdiag/loading.py", "tdiag/debug/batches.py", "tdiag/debug/context.py"):
        assert not usercode._is_user_frame(str(root / mod), root)
    assert usercode._is_user_frame(str(root / "my_model.py"), root)
