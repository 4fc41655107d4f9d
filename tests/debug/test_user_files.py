"""Model files written the way people write them (found by trying `tdiag check` as a new user).

nanoGPT-style forwards that return only the last position without targets, ``(x, y)``
batches, ``get_batch(split)``, dict batches for a forward whose first argument is not called
``input_ids``, a loss_fn that crashes or is summed, a model without a config whose context
length shows only in its shapes, and the follow-on findings a NaN loss must not multiply.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.debug.runner import SINGLE_THREAD_MAX_PARAMS, _cpu_threads, check_command
from tdiag.debug.sanity import IMPROVING_WINDOW, _improving
from tdiag.loading import LoadError, load_target

# A tiny causal LM: token + position embedding, then a causal (or, with MIX = "mean", a
# leaking) average over positions, then a head. forward(idx, targets=None) like nanoGPT.
LM = """
import torch
import torch.nn.functional as F
from torch import nn

V, BLOCK, D = 40, 24, 16
MIX = "cumsum"
LAST_ONLY = False

class Mixer(nn.Module):
    def forward(self, x):
        n = torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        if MIX == "mean":
            return x.mean(1, keepdim=True).expand_as(x)
        return x.cumsum(1) / n

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(BLOCK, D)
        self.mix = Mixer()
        self.head = nn.Linear(D, V)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.mix(x)
        if targets is None and LAST_ONLY:
            return self.head(x[:, [-1], :]), None  # nanoGPT's inference-time shortcut
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return logits, loss

def build_model():
    return LM()
"""


def write(tmp_path: Path, *parts: str, name: str = "user_lm.py") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(textwrap.dedent(p) for p in parts))
    return path


def run_json(path: Path, capsys: pytest.CaptureFixture[str], only: str | None = None) -> tuple:
    capsys.readouterr()
    code = check_command(str(path), json_out=True, only=only, timeout=60)
    return code, json.loads(capsys.readouterr().out)


def statuses(report: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in report["checks"]}


def errors(report: dict) -> list[tuple[str, str | None]]:
    return [(f["id"], f["where"]) for f in report["findings"] if f["severity"] == "error"]


# -- nanoGPT's forward(idx, targets=None) --------------------------------------------------------
def test_last_position_only_forward_gets_targets(tmp_path: Path) -> None:
    ctx = load_target(str(write(tmp_path, LM, "LAST_ONLY = True")))
    assert ctx.targets_arg == "targets"
    ids = ctx.input_ids
    assert tuple(ctx.forward().shape) == (*ids.shape, 40)  # every position, not only the last
    # the model's own loss on next-token targets (input_ids shifted left) is the training loss
    _, own = ctx.model(ids, targets=ids.roll(-1, 1))
    assert torch.allclose(ctx.loss(), own)


@pytest.mark.parametrize(("mix", "leak"), [("cumsum", False), ("mean", True)])
def test_checks_see_every_position_of_a_last_only_forward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mix: str, leak: bool
) -> None:
    path = write(tmp_path, LM, "LAST_ONLY = True", f"MIX = {mix!r}")
    code, report = run_json(path, capsys, only="causal.leak,loss.init-mismatch,grad.missing")
    assert statuses(report)["causal.leak"] == ("fail" if leak else "pass")
    assert errors(report) == ([("causal.leak", "mix")] if leak else [])
    assert code == (1 if leak else 0)


def test_last_only_output_without_targets_parameter_is_exit_2(tmp_path: Path) -> None:
    body = LM.replace("def forward(self, idx, targets=None):", "def forward(self, idx):")
    body = body.replace("targets is None and LAST_ONLY", "LAST_ONLY").replace(
        "if targets is not None:", "if False:"
    )
    res = CliRunner().invoke(app, ["check", str(write(tmp_path, body, "LAST_ONLY = True"))])
    assert res.exit_code == 2 and "got (4, 1, 40)" in res.stderr, res.stderr


# -- batches as people write them ----------------------------------------------------------------
XY_BATCH = """
def get_batch():
    data = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(0))
    x = torch.stack([data[i : i + 16] for i in (0, 50, 100)])
    y = torch.stack([data[i + 1 : i + 17] for i in (0, 50, 100)])
    return x, y
"""


def test_xy_tuple_batch(tmp_path: Path) -> None:
    ctx = load_target(str(write(tmp_path, LM, XY_BATCH)))
    # the forward gives every position without targets: called as model(x)
    assert ctx.batch_style == "tuple" and ctx.targets_arg is None
    x, y = ctx.batch["input_ids"], ctx.batch["targets"]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # y is already aligned with the positions: neither tdiag nor the model shifts it again
    logits = ctx.forward()
    expected = F.cross_entropy(logits.reshape(-1, 40), y.reshape(-1))
    assert torch.allclose(ctx.default_loss(logits), expected)
    assert torch.allclose(ctx.loss(), expected)
    assert ctx.model_inputs()[1] is y  # loss_fn(model, batch) gets the (x, y) pair back
    last_only = load_target(str(write(tmp_path, LM, XY_BATCH, "LAST_ONLY = True", name="b.py")))
    assert last_only.targets_arg == "targets"  # model(x, targets=y): every position
    assert torch.equal(last_only.next_targets(), last_only.batch["targets"])
    assert tuple(last_only.forward().shape) == (3, 16, 40)


def test_flattened_logits_are_reshaped(tmp_path: Path) -> None:
    # the "Let's build GPT" video returns logits.view(B * T, C) when given targets
    body = LM.replace(
        "        logits = self.head(x)\n", "        logits = self.head(x).flatten(0, 1)\n"
    )
    body = body.replace("logits.reshape(-1, V)", "logits")
    assert "flatten(0, 1)" in body
    ctx = load_target(str(write(tmp_path, body, XY_BATCH)))
    assert tuple(ctx.forward().shape) == (3, 16, 40)


def test_xy_batch_with_loss_fn_runs_clean(tmp_path: Path, capsys) -> None:
    loss_fn = """
    def loss_fn(model, batch):
        x, y = batch
        return model(x, y)[1]
    """
    code, report = run_json(write(tmp_path, LM, XY_BATCH, loss_fn), capsys)
    assert code == 0 and not errors(report)
    assert "error" not in statuses(report).values()
    assert statuses(report)["data.labels-all-ignored"] == "pass"


def test_batch_function_with_arguments_is_passed_over(tmp_path: Path) -> None:
    split = XY_BATCH.replace("def get_batch():", "def get_batch(split):")
    res = CliRunner().invoke(app, ["check", str(write(tmp_path, LM, split)), "--only", "data"])
    assert res.exit_code == 2 and "get_batch(split)" in res.stderr
    assert "example_batch" in res.stderr
    fixed = split + "\ndef example_batch():\n    return get_batch('train')\n"
    ctx = load_target(str(write(tmp_path, LM, fixed, name="fixed.py")))
    assert ctx.batch_from_file and ctx.batch_style == "tuple"


MASKED = """
import torch
from torch import nn

class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)
        self.head = nn.Linear(8, 30)

    def forward(self, x, attention_mask=None):  # first argument not called input_ids
        h = self.embed(x)
        if attention_mask is not None:
            m = attention_mask[..., None].float()
            return self.head(h + (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True))
        return self.head(h + h.mean(1, keepdim=True))

def build_model():
    return Enc()

CAUSAL = False

def get_batch():
    ids = torch.randint(1, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
"""


def test_dict_batch_for_a_forward_taking_x(tmp_path: Path, capsys) -> None:
    code, report = run_json(write(tmp_path, MASKED), capsys, only="padding.leak,grad.missing")
    assert code == 0 and statuses(report)["padding.leak"] == "pass"


def test_padding_leak_says_when_forward_takes_no_mask(tmp_path: Path, capsys) -> None:
    body = MASKED.replace("def forward(self, x, attention_mask=None):", "def forward(self, x):")
    body = body.replace("if attention_mask is not None:", "if False:")
    body = body.replace("attention_mask[..., None]", "x[..., None]")
    code, report = run_json(write(tmp_path, body), capsys, only="padding.leak")
    (leak,) = [f for f in report["findings"] if f["id"] == "padding.leak"]
    assert code == 1 and leak["severity"] == "error"
    assert "Enc.forward() does not even take" in leak["message"]


def test_context_length_read_from_position_table_and_mask(tmp_path: Path) -> None:
    ctx = load_target(str(write(tmp_path, LM)))  # no config: 24 rows of `pos`
    assert ctx.input_ids.shape[1] == 24
    mask_model = """
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(20, 8)
            self.register_buffer("mask", torch.full((10, 10), float("-inf")).triu(1))
            self.h = nn.Linear(8, 20)

        def forward(self, x):
            att = torch.softmax(self.mask[: x.shape[1], : x.shape[1]], -1)
            return self.h(att @ self.e(x))

    def build_model():
        return M()
    """
    ctx = load_target(str(write(tmp_path, mask_model, name="masked.py")))
    assert ctx.input_ids.shape[1] == 10


# -- bad input the first version let through -------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ("def get_batch():\n    return torch.zeros(0, 8, dtype=torch.long)", ["(0, 8)"]),
        (
            "def get_batch():\n    x = torch.randint(0, V, (2, 8))\n"
            "    return {'input_ids': x, 'labels': x.float()}",
            ["labels", "float32"],
        ),
        (
            "def loss_fn(model, batch):\n    return helper()\n"
            "def helper():\n    raise RuntimeError('loss exploded')",
            ["computing the loss raised RuntimeError: loss exploded", "in helper"],
        ),
        (
            "def loss_fn(model, batch):\n    return torch.ones(3)",
            ["bad loss", "shape (3,)"],
        ),
        ("import sys\nsys.exit('usage: train.py --lr LR')", ["sys.exit", "__main__"]),
    ],
    ids=["empty-batch", "float-labels", "loss-raises", "loss-not-scalar", "exit-at-import"],
)
def test_bad_user_input_is_exit_2(tmp_path: Path, extra: str, needles: list[str]) -> None:
    res = CliRunner().invoke(app, ["check", str(write(tmp_path, LM, extra))])
    out = res.stderr
    assert res.exit_code == 2, (res.exit_code, out, res.stdout)
    for n in needles:
        assert n in out, (n, out)
    assert "Traceback (most recent call last)" not in out and "tdiag/" not in out
    assert res.stdout == ""


def test_int32_token_ids_are_accepted(tmp_path: Path, capsys) -> None:
    batch = "def get_batch():\n    return torch.randint(0, V, (2, 8), dtype=torch.int32)"
    code, report = run_json(write(tmp_path, LM, batch), capsys)
    assert "error" not in statuses(report).values(), report["checks"]
    assert code == 0


def test_load_error_for_labels_beyond_the_output_leaves_data_checks(tmp_path: Path) -> None:
    batch = (
        "def get_batch():\n    x = torch.randint(0, V, (2, 8))\n"
        "    return {'input_ids': x, 'labels': x + V}"
    )
    body = LM.replace(
        "def forward(self, idx, targets=None):", "def forward(self, idx, labels=None):"
    )
    body = body.replace("targets", "labels")
    try:
        ctx = load_target(str(write(tmp_path, body, batch)))
    except LoadError as exc:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"labels out of range must reach data.token-out-of-range, got {exc}")
    assert "labels outside" in ctx.cache["blocked"]


# -- findings: summed loss, no cascade after a NaN loss -------------------------------------------
SUMMED = """
def loss_fn(model, batch):
    logits, _ = model(batch)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1), reduction=REDUCTION
    )
"""


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_summed_loss_is_named(tmp_path: Path, capsys, reduction: str) -> None:
    path = write(tmp_path, LM, SUMMED, f"REDUCTION = {reduction!r}")
    _, report = run_json(path, capsys, only="loss.init-mismatch")
    found = [f for f in report["findings"] if f["id"] == "loss.init-mismatch"]
    if reduction == "mean":
        assert found == []
        return
    (f,) = found
    assert "summed" in f["title"] and f["evidence"]["n_targets"] == 4 * 23
    assert abs(f["evidence"]["loss_per_target"] - f["evidence"]["ln_vocab"]) < 1.0
    assert "reduction='mean'" in f["recommendation"]


def test_nan_loss_is_reported_once_not_by_every_check(tmp_path: Path, capsys) -> None:
    batch = (
        "def get_batch():\n    x = torch.randint(0, V, (2, 8))\n"
        "    return {'input_ids': x, 'labels': torch.full_like(x, -100)}"
    )
    body = LM.replace(
        "def forward(self, idx, targets=None):", "def forward(self, idx, labels=None):"
    )
    body = body.replace("targets", "labels").replace("ignore_index=-1", "ignore_index=-100")
    code, report = run_json(write(tmp_path, body, batch), capsys)
    st = statuses(report)
    assert code == 1 and st["data.labels-all-ignored"] == "fail"
    for cid in ("grad.exploding", "grad.vanishing", "train.cannot-overfit"):
        assert st[cid] == "skipped", (cid, st[cid])
    assert st["loss.init-mismatch"] == "skipped"
    assert errors(report) == [("data.labels-all-ignored", None)]  # one cause, one error


def test_seed_repeats_every_finding(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, LM, "MIX = 'mean'", XY_BATCH)
    runs = [run_json(path, capsys)[1]["findings"] for _ in range(2)]
    assert runs[0] == runs[1] and any(f["id"] == "causal.leak" for f in runs[0])


# -- the overfit check keeps going while the loss still falls --------------------------------------
def test_overfit_extension_rule() -> None:
    steady = [4.0 - 0.03 * i for i in range(70)]
    assert _improving(steady, elapsed=1.0)
    assert not _improving(steady, elapsed=100.0)  # out of time
    flat = [4.0 - 0.001 * i for i in range(70)]
    assert not _improving(flat, elapsed=1.0)
    assert not _improving(steady[:IMPROVING_WINDOW], elapsed=1.0)


# -- threads ------------------------------------------------------------------------------------
def test_small_cpu_models_run_single_threaded(tmp_path: Path, monkeypatch) -> None:
    ctx = load_target(str(write(tmp_path, LM)))
    assert sum(p.numel() for p in ctx.model.parameters()) < SINGLE_THREAD_MAX_PARAMS
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with _cpu_threads(ctx):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's choice wins
    with _cpu_threads(ctx):
        assert torch.get_num_threads() == before


# -- where: the output layer; one-hot inputs are not dead units ----------------------------------
HEADS = """
import torch
import torch.nn.functional as F
from torch import nn

FUNCTIONAL = False

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 16)
        self.head = nn.Linear(16, 30)
        nn.init.normal_(self.head.weight, std=2.0)  # logits far too large at init
        self.norm = nn.LayerNorm(16)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, input_ids, labels=None):
        h = self.norm(self.tok(input_ids))
        logits = h @ (4 * self.tok.weight).T if FUNCTIONAL else self.head(h)
        loss = None
        if labels is not None:  # the loss module is the last module to run
            loss = self.loss(logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1))
        return {"logits": logits, "loss": loss}

def build_model():
    return M()

def get_batch():
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}
"""


@pytest.mark.parametrize(("functional", "where"), [(False, "head"), (True, None)])
def test_logit_findings_name_the_output_layer(
    tmp_path: Path, capsys, functional: bool, where: str | None
) -> None:
    path = write(tmp_path, HEADS, f"FUNCTIONAL = {functional}")
    _, report = run_json(path, capsys, only="init.logit-scale,loss.init-mismatch")
    found = {f["id"]: f["where"] for f in report["findings"]}
    assert found == {"init.logit-scale": where, "loss.init-mismatch": where}


ONE_HOT = """
import torch
import torch.nn.functional as F
from torch import nn

DEAD = False

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(50, 32)  # fed one-hot tokens: most vocabulary entries are absent
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 50)
        if DEAD:
            nn.init.constant_(self.up.bias, -10.0)

    def forward(self, x):
        h = self.inp(F.one_hot(x, 50).float())
        return self.down(torch.relu(self.up(h)))

def build_model():
    return M()

def get_batch():
    return torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
"""


@pytest.mark.parametrize("dead", [False, True])
def test_one_hot_inputs_are_not_dead_units(tmp_path: Path, capsys, dead: bool) -> None:
    path = write(tmp_path, ONE_HOT, f"DEAD = {dead}")
    _, report = run_json(path, capsys, only="grad.dead-units")
    flagged = {n for f in report["findings"] for n in f["evidence"]["dead_fraction"]}
    assert "inp" not in flagged  # 50 one-hot inputs, most absent from 64 tokens: not dead
    if dead:
        (f,) = report["findings"]
        assert (f["where"], f["severity"]) == ("down", "error")
        assert f["evidence"]["dead_fraction"]["down"] == 1.0


RAW = """
import torch
from torch import nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 32)
        self.pos_emb = nn.Parameter(torch.randn(16, 32))  # a table: N(0, 1) is usual
        self.w_mix = nn.Parameter(torch.randn(32, 32) * SCALE)  # used as x @ W
        self.head = nn.Linear(32, 40)

    def forward(self, x):
        h = self.tok(x) + self.pos_emb[: x.shape[1]]
        return self.head(h @ self.w_mix)

def build_model():
    return M()
"""


@pytest.mark.parametrize(("scale", "flagged"), [(1.0, ["w_mix"]), (32**-0.5, [])])
def test_raw_parameter_tables_are_not_weights(tmp_path: Path, capsys, scale, flagged) -> None:
    _, report = run_json(
        write(tmp_path, RAW, f"SCALE = {scale}"), capsys, only="init.std-out-of-range"
    )
    bad = [
        p["name"]
        for f in report["findings"]
        if f["severity"] == "warning"
        for p in f["evidence"]["params"]
    ]
    assert bad == flagged
    table = {r["name"]: r for r in report["findings"][-1]["evidence"]["table"]}
    assert "ratio" not in table["pos_emb"] and "ratio" in table["w_mix"]


@pytest.mark.hf
def test_hugging_face_encoder_is_bidirectional_without_the_flag(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    src = (Path(__file__).parent / "models" / "b2_hf_bert.py").read_text()
    assert "CAUSAL = False" in src
    ctx = load_target(str(write(tmp_path, src.replace("CAUSAL = False", ""), name="bert.py")))
    assert ctx.causal is False  # BertForMaskedLM.can_generate() is False
    gpt2 = (Path(__file__).parent / "models" / "b2_hf_gpt2.py").read_text()
    assert "CAUSAL" not in gpt2
    assert load_target(str(write(tmp_path, gpt2, name="gpt2.py"))).causal is True


def test_dict_batch_with_targets_for_a_last_only_forward(tmp_path: Path, capsys) -> None:
    batch = """
    def get_batch():
        x = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
        return {"input_ids": x, "targets": x.roll(-1, 1)}
    """
    path = write(tmp_path, LM, "LAST_ONLY = True", batch)
    ctx = load_target(str(path))
    assert ctx.batch_style == "dict" and ctx.targets_arg == "targets"
    assert ctx.forward({"input_ids": ctx.input_ids}).shape[1] == 16  # a batch without targets
    code, report = run_json(path, capsys)
    assert code == 0 and "error" not in statuses(report).values(), report["checks"]


def test_half_precision_weights_are_named_when_training_diverges(tmp_path: Path, capsys) -> None:
    body = """
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 16)
            self.l = nn.Linear(16, 50)

        def forward(self, x):
            return self.l(self.e(x))

    def build_model():
        return M().to(DTYPE)
    """
    results = {}
    for dtype in ("float16", "float32"):
        path = write(tmp_path, body, f"DTYPE = torch.{dtype}", name=f"m_{dtype}.py")
        results[dtype] = run_json(path, capsys, only="train.cannot-overfit")[1]["findings"]
    (f,) = results["float16"]  # Adam's eps underflows in float16: NaN after a step or two
    assert f["severity"] == "error" and "float16" in f["recommendation"]
    assert all(x["severity"] != "error" for x in results["float32"])


def test_blocks_are_the_layer_stack_not_the_heads_inside_a_layer() -> None:
    # "Let's build GPT" style: each layer holds an nn.ModuleList of 8 heads; 3 layers
    from torch import nn

    from tdiag.debug.context import CheckContext

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(8)])
            self.ff = nn.Linear(16, 16)

    model = nn.Module()
    model.blocks = nn.Sequential(*[Layer() for _ in range(3)])
    ctx = CheckContext(model=model, batch={"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert [n for n, _ in ctx.block_modules()] == ["blocks.0", "blocks.1", "blocks.2"]
