"""The Monitor dropped into loops a new user writes: optional losses, mixed precision with a
GradScaler (skipped steps are not alarms), ``mon.log``/``mon.step`` misuse."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from tdiag.monitor import Monitor

from .conftest import ListSink, lm_loss, make_batch, quiet_options


def _scaler_loop(model, mon, opt, scaler, steps, *, fp16=True, pass_norm=False, plant_nan=None):
    """fp16 autocast + GradScaler, zero_grad at the top (grads still there at mon.step)."""
    norms = []
    for step in range(1, steps + 1):
        ids = make_batch(step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = lm_loss(model(ids), ids)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if plant_nan == step:
            next(model.parameters()).grad.fill_(math.nan)
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        scaler.step(opt)
        scaler.update()
        mon.step(loss, tokens=ids.numel(), grad_norm=norms[-1] if pass_norm else None)
    return norms


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pass_norm", [False, True])
def test_gradscaler_skipped_steps_are_not_alerts(tiny_gpt, tmp_path, fused, pass_norm):
    # init_scale 2**20: the first step overflows in fp16 and the scaler skips it (normal).
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    sink = ListSink()
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=2)) as mon:
        norms = _scaler_loop(tiny_gpt, mon, opt, scaler, 4, pass_norm=pass_norm)
    assert not math.isfinite(float(norms[0]))  # the planted-by-fp16 overflow happened
    assert scaler.get_scale() < 2.0**20
    assert mon.findings == [] and sink.events == []
    rows = sink.merged()
    if fused:  # optimizer.step() ran (and skipped itself on found_inf): step 1 is logged
        assert sorted(rows) == [1, 2, 4]
        assert rows[1]["train/skipped_steps"] == 1.0 and rows[2]["train/skipped_steps"] == 0.0
        assert "train/grad_norm" not in rows[1]  # no norm of a skipped (inf) step
        first = 2
    else:
        # No optimizer step at step 1: the first row waits until steps 2 and 3 show real
        # steps (not micro-batches, see cadence.py), then covers steps 1-3.
        assert sorted(rows) == [3, 4]
        assert rows[3]["train/skipped_steps"] == 1.0
        first = 3
    assert rows[4]["train/skipped_steps"] == 0.0
    # the reported norm is of the unscaled gradients (the loop's after unscale_)
    assert math.isclose(rows[first]["train/grad_norm"], float(norms[first - 1]), rel_tol=1e-4)
    assert math.isclose(rows[4]["train/grad_norm"], float(norms[3]), rel_tol=1e-4)


def test_fused_probe_unscales_without_unscale_call(tiny_gpt, tmp_path):
    # No unscale_(): GradScaler.step() hands the fused optimizer scaled grads + grad_scale.
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    sink = ListSink()
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=1)) as mon:
        ids = make_batch(1)
        loss = lm_loss(tiny_gpt(ids), ids)
        scaler.scale(loss).backward()
        expected = math.sqrt(sum(float(p.grad.square().sum()) for p in tiny_gpt.parameters()))
        scaler.step(opt)
        scaler.update()
        mon.step(loss)
    assert math.isclose(sink.merged()[1]["train/grad_norm"], expected / 256.0, rel_tol=1e-4)


def test_nan_gradient_without_a_scaler_skip_is_still_an_alert(tiny_gpt, tmp_path):
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # the optimizer steps on NaN
    sink = ListSink()
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=2)) as mon:
        _scaler_loop(tiny_gpt, mon, opt, scaler, 2, fp16=False, pass_norm=True, plant_nan=2)
    assert [f.id for f in sink.events] == ["train.nonfinite-grad"]
    assert sink.events[0].step == 2


def test_steps_without_loss_are_not_a_nonfinite_loss(tiny_gpt, tmp_path):
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-3)
    sink = ListSink()
    losses = []
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=4)) as mon:
        for step in range(1, 5):
            ids = make_batch(step)
            loss = lm_loss(tiny_gpt(ids), ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            # a float loss on steps 2-3, no loss (None) on 4; grad norm only on step 3
            mon.step(losses[-1] if step < 4 else None, grad_norm=2.0 if step == 3 else None)
    assert sink.events == []
    row = sink.merged()[4]  # the interval of steps 2..4
    assert math.isclose(row["train/loss"], (losses[1] + losses[2]) / 2, rel_tol=1e-6)
    assert row["train/loss_last"] == pytest.approx(losses[2])
    assert row["train/grad_norm_max"] == 2.0


def test_log_skips_non_numbers_and_calls_after_close_warn_once(tiny_gpt, tmp_path, caplog):
    sink = ListSink()
    mon = Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path))
    mon.log({"val/loss": torch.tensor(2.5), "note": "hello", "val/acc": torch.tensor([0.5])})
    assert sink.rows[-1] == (0, {"val/loss": 2.5, "val/acc": 0.5})
    assert "'note'" in caplog.text
    mon.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.monitor"):
        mon.step(torch.tensor(1.0))
        mon.step(torch.tensor(1.0))
        mon.log({"val/loss": 1.0})
    assert len(caplog.records) == 1 and "after close()" in caplog.text
    assert len(sink.rows) == 1


def _train_layers(model, fwd, tmp_path, steps=1):
    sink = ListSink()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opts = quiet_options(tmp_path, log_every=1, watch="layers", peak_flops=1e12)
    with Monitor(model, opt, sinks=[sink], **opts) as mon:
        for _ in range(steps):
            loss = fwd(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
    return sink.merged()[steps]


class TupleAttention(nn.Module):
    """Attention owning its weights directly and returning ``(out, probs)``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.w_qkv = nn.Parameter(torch.randn(d, 3 * d) / d**0.5)

    def forward(self, x):
        q, k, v = (x @ self.w_qkv).chunk(3, dim=-1)
        probs = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return probs @ v, probs


class CompositeAttention(nn.Module):
    """Like the reference model's ``blocks.{i}.attn``: child projections, ``(out, probs)``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        probs = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(probs @ v) * 2.0, probs  # * 2: the module's output is not proj's


class TupleBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = CompositeAttention(d)

    def forward(self, x):
        return x + self.attn(x)[0]


class TupleNet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = TupleAttention(d)
        self.blocks = nn.ModuleList([TupleBlock(d)])
        self.out = nn.Linear(d, d)

    def forward(self, x):
        y, _ = self.attn(x)
        for block in self.blocks:
            y = block(y)
        return self.out(y)


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


def test_layers_measure_tuple_returning_attention_and_blocks(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    model = TupleNet()
    with torch.no_grad():  # with the weights of the (logged) first step
        y, _ = model.attn(x)
        block_attn, _ = model.blocks[0].attn(y)
        block_out = model.blocks[0](y)
    row = _train_layers(model, lambda m: m(x).square().mean(), tmp_path)
    assert math.isclose(row["act_rms/attn"], _rms(y), rel_tol=1e-5)
    assert math.isclose(row["act_rms/blocks.0.attn"], _rms(block_attn), rel_tol=1e-5)
    assert math.isclose(row["act_rms/blocks.0"], _rms(block_out), rel_tol=1e-5)  # residual
    assert "act_rms/blocks.0.attn.qkv" in row and "act_rms/out" in row
    assert "act_rms/blocks" not in row  # a ModuleList runs no forward


def test_layers_on_nn_transformer_encoder_measure_self_attention(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = enc.layers[0].self_attn(x, x, x, need_weights=False)[0]
    row = _train_layers(enc, lambda m: m(x).square().mean(), tmp_path)
    # MultiheadAttention's out_proj never runs its own forward: the module itself is measured
    naive = float(expected.square().mean().sqrt())
    assert math.isclose(row["act_rms/layers.0.self_attn"], naive, rel_tol=1e-4)
    assert "attn/entropy/layers.0.self_attn" in row


class LossFirstOutput(dict):
    """Like a Hugging Face ModelOutput with labels: ``loss`` before ``logits``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class LossFirstLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        logits = self.head(self.embed(ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return LossFirstOutput(loss=loss, logits=logits)


def test_layers_take_logits_from_an_output_with_the_loss_first(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 6))
    model = LossFirstLM()
    with torch.no_grad():
        logits = model(ids).logits
    row = _train_layers(model, lambda m: m(ids).loss, tmp_path)
    assert math.isclose(row["logits/max_abs"], float(logits.abs().max()), rel_tol=1e-5)
    assert math.isclose(
        row["logits/log_z"], float(torch.logsumexp(logits, -1).mean()), rel_tol=1e-5
    )


@pytest.mark.slow
def test_layers_on_hugging_face_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (2, 8))
    row = _train_layers(model, lambda m: m(ids, labels=ids).loss, tmp_path)
    assert "logits/max_abs" in row and "attn/entropy/transformer.h.0.attn" in row
    assert "act_rms/transformer.h.0.attn.c_attn" in row


def _plain_steps(model, mon, steps, start=0):
    opt = mon.optimizer
    for step in range(start + 1, start + steps + 1):
        ids = make_batch(step)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss, tokens=ids.numel())


def test_unwritable_run_dir_warns_once_and_training_goes_on(tiny_gpt, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-3)
    sink = ListSink()
    opts = quiet_options(tmp_path, log_every=1, run_dir=blocker / "run", tensorboard=True)
    opts["report"] = True
    with (
        caplog.at_level(logging.WARNING, logger="tdiag"),
        Monitor(tiny_gpt, opt, sinks=[sink], **opts) as mon,
    ):
        _plain_steps(tiny_gpt, mon, 3)
        mon.log({"val/loss": 1.0})
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot write to run_dir" in warnings[0].getMessage()
    assert [s for s, _ in sink.rows] == [1, 2, 3, 3]  # the other sinks still get everything
    assert mon.status == "completed"


def test_resumed_run_dir_warns_unless_the_state_is_loaded(tiny_gpt, tmp_path, caplog):
    from tdiag.history import read_history

    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-3)
    opts = quiet_options(tmp_path, log_every=2)
    with Monitor(tiny_gpt, opt, **opts) as mon:
        _plain_steps(tiny_gpt, mon, 4)
        state = mon.state_dict()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tdiag"), Monitor(tiny_gpt, opt, **opts) as mon:
        mon.load_state_dict(state)
        _plain_steps(tiny_gpt, mon, 4, start=4)
    assert "already has a history" not in caplog.text
    df, _ = read_history(opts["run_dir"])
    assert df["step"].tolist() == [1, 2, 4, 5, 6, 8]  # 5: the restart marker (run/restart)
    assert df.loc[df["step"] == 5, "run/restart"].tolist() == [4.0]
    train = df.dropna(subset=["train/loss"])
    assert train["train/tokens"].tolist() == [64.0 * s for s in (1, 2, 4, 6, 8)]
    with caplog.at_level(logging.WARNING, logger="tdiag"), Monitor(tiny_gpt, opt, **opts) as mon:
        _plain_steps(tiny_gpt, mon, 1)  # forgot load_state_dict
    assert caplog.text.count("already has a history") == 1


def test_console_line_shows_skipped_steps():
    from tdiag.monitor.sinks.console import format_metrics

    assert "skipped 2" in format_metrics({"train/loss": 1.0, "train/skipped_steps": 2.0})
    assert not any("skipped" in f for f in format_metrics({"train/skipped_steps": 0.0}))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("bad batch")])
def test_interrupt_or_error_in_the_block_propagates_unchanged(tiny_gpt, tmp_path, exc):
    import json

    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-3)
    opts = quiet_options(tmp_path, log_every=10)
    with pytest.raises(type(exc)) as info, Monitor(tiny_gpt, opt, **opts) as mon:
        _plain_steps(tiny_gpt, mon, 3)
        raise exc
    assert info.value is exc
    lines = (opts["run_dir"] / "flight_recorder.jsonl").read_text().splitlines()
    header = json.loads(lines[0])["flight_recorder"]
    assert header["reason"] == "exception" and type(exc).__name__ in header["detail"]
    assert [json.loads(line)["step"] for line in lines[1:]] == [1, 2, 3]
    meta = json.loads((opts["run_dir"] / "meta.json").read_text())
    assert meta["end"]["status"] == "exception" and meta["end"]["steps"] == 3


@pytest.mark.parametrize("fused", [False, True])
def test_strict_mode_does_not_raise_on_a_scaler_skipped_step(tiny_gpt, tmp_path, fused):
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    opts = quiet_options(tmp_path, log_every=2, strict=True)
    with Monitor(tiny_gpt, opt, **opts) as mon:
        norms = _scaler_loop(tiny_gpt, mon, opt, scaler, 3, pass_norm=True)
    assert not math.isfinite(float(norms[0])) and mon.status == "completed"


def test_strict_mode_raises_on_a_nan_float_loss(tiny_gpt, tmp_path):
    from tdiag.monitor import NonFiniteError

    with (
        pytest.raises(NonFiniteError),
        Monitor(tiny_gpt, **quiet_options(tmp_path, strict=True)) as mon,
    ):
        mon.step(1.0)
        mon.step(math.nan)


def test_without_optimizer_the_norm_comes_from_the_backward(tiny_gpt, tmp_path, caplog):
    def manual_sgd_loop(mon, zero_before_step):
        for step in range(1, 3):
            ids = make_batch(step)
            loss = lm_loss(tiny_gpt(ids), ids)
            loss.backward()
            with torch.no_grad():
                for p in tiny_gpt.parameters():
                    p -= 1e-3 * p.grad
            expected.append(
                math.sqrt(sum(float(p.grad.square().sum()) for p in tiny_gpt.parameters()))
            )
            if zero_before_step:
                tiny_gpt.zero_grad()
            mon.step(loss, tokens=torch.tensor(ids.numel()))  # tokens as a tensor
            tiny_gpt.zero_grad()

    expected: list[float] = []
    sink = ListSink()
    with Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path, log_every=2)) as mon:
        manual_sgd_loop(mon, zero_before_step=False)
    rows = sink.merged()
    assert math.isclose(rows[2]["train/grad_norm"], expected[1], rel_tol=1e-5)
    assert rows[2]["train/tokens"] == 2 * 64
    assert "train/skipped_steps" not in rows[2]  # no optimizer: cannot tell
    assert "optimizer=" not in caplog.text
    sink = ListSink()
    with (
        caplog.at_level(logging.WARNING, logger="tdiag"),
        Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path / "b", log_every=1)) as mon,
    ):
        manual_sgd_loop(mon, zero_before_step=True)
    # zero_grad() before step(): the norm was taken when backward finished (probe.py)
    rows = sink.merged()
    assert math.isclose(rows[1]["train/grad_norm"], expected[2], rel_tol=1e-5)
    assert math.isclose(rows[2]["train/grad_norm"], expected[3], rel_tol=1e-5)
    assert "no optimizer= was given" not in caplog.text
