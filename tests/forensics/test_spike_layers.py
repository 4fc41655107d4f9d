"""A replayed loss spike says which layer's statistics moved first (tdiag/forensics/layers.py):
attention max logit, output log Z, per-layer gradient norm, spike step against the step before.

The run: TinyGPT (tests/monitor/conftest.py) learning the arithmetic-progression pattern of
tests/monitor/test_spikes.py; at the spike steps the batch carries a gain on block 1's queries
(an attention-logit blow-up that only that layer's attention sees first), or random tokens (a
data spike whose attention logits stay put)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tdiag import Monitor
from tdiag.forensics.layers import MOVED_FACTOR, compare, layer_names
from tests.monitor.conftest import VOCAB, TinyBlock, TinyGPT, lm_loss, quiet_options
from tests.monitor.test_spikes import pattern_batch

SPIKE_STEP = 85
GAIN = 30.0


class GainBlock(TinyBlock):
    """TinyBlock whose queries are multiplied by ``q_gain`` (set per call by the loss_fn)."""

    q_gain = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)
        q, v = q * self.q_gain, v * self.q_gain
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GainGPT(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[1] = GainBlock(32, 2)


def gain_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.blocks[1].q_gain = float(batch["gain"])
    return lm_loss(model(batch["ids"]), batch["ids"])


def run(tmp_path, *, gain_at=(), random_at=(), steps: int = 100, **options):
    torch.manual_seed(0)
    model = GainGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opts = quiet_options(tmp_path, log_every=10, forensics=True, loss_fn=gain_loss, **options)
    with Monitor(model, opt, **opts) as mon:
        for step in range(1, steps + 1):
            ids = pattern_batch(step)
            if step in random_at:
                g = torch.Generator().manual_seed(1000 + step)
                ids = torch.randint(0, VOCAB, ids.shape, generator=g)
            batch = {"ids": ids, "gain": GAIN if step in gain_at else 1.0}
            loss = gain_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss, batch=batch)
    return mon


def spike_of(mon):
    found = [f for f in mon.findings if f.id == "train.loss-spikes"]
    assert len(found) == 1, [(f.id, f.step) for f in mon.findings]
    return found[0]


def test_an_attention_logit_blow_up_names_the_layer_and_the_statistic(tmp_path):
    f = spike_of(run(tmp_path, gain_at=(SPIKE_STEP,)))
    fx = f.evidence["forensics"]
    assert fx["step"] == SPIKE_STEP and fx["cause"] == "data", fx
    first = fx["moved_first"]
    assert (first["layer"], first["statistic"]) == ("blocks.1", "attn_max_logit"), fx["layers"]
    assert first["ratio"] >= MOVED_FACTOR and first["spike"] > first["healthy"]
    table = {row["layer"]: row for row in fx["layers"]["table"]}
    assert [row["layer"] for row in fx["layers"]["table"]] == [
        "embed",
        "pos",
        "blocks.0",
        "blocks.1",
        "norm_f",
        "lm_head",
    ]
    assert table["blocks.0"]["attn_max_logit"] < MOVED_FACTOR  # the layer before did not move
    assert table["lm_head"]["log_z"] is not None and table["embed"]["attn_max_logit"] is None
    assert fx["layers"]["healthy_step"] == SPIKE_STEP - 1
    assert f.where == "blocks.1"
    assert "attention max logit of blocks.1" in f.message


def test_a_random_token_spike_does_not_blame_the_attention(tmp_path):
    f = spike_of(run(tmp_path, random_at=(SPIKE_STEP,)))
    fx = f.evidence["forensics"]
    assert fx["step"] == SPIKE_STEP and fx["cause"] == "data", fx
    for row in fx["layers"]["table"]:
        assert row["attn_max_logit"] is None or row["attn_max_logit"] < MOVED_FACTOR, row
    first = fx["moved_first"]
    assert first is not None and first["statistic"] == "grad_norm", fx["layers"]
    assert f"gradient norm of {first['layer']}" in f.message


def test_a_healthy_run_replays_nothing(tmp_path):
    mon = run(tmp_path, steps=60)
    assert not [f for f in mon.findings if f.id == "train.loss-spikes"]
    assert mon.keeper.enabled


@pytest.mark.slow
def test_the_report_shows_what_moved_first(tmp_path):
    run(tmp_path, gain_at=(SPIKE_STEP,), report=True)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    live = [a for a in report["live_alerts"] if a["id"] == "train.loss-spikes"]
    assert live and live[0]["evidence"]["forensics"]["moved_first"]["layer"] == "blocks.1"
    (rule,) = [f for f in report["findings"] if f["id"] == "train.loss-spikes"]
    assert rule["evidence"]["forensics"]["moved_first"]["statistic"] == "attn_max_logit"
    assert "attention max logit of blocks.1" in rule["message"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "attention max logit of blocks.1" in html


# -- the comparison itself ------------------------------------------------------------------
def _side(stats, fwd, back=None):
    return {"forward_order": fwd, "backward_order": back or list(reversed(fwd)), "stats": stats}


def test_compare_takes_forward_statistics_before_gradient_norms():
    fwd = ["a", "b", "c"]
    healthy = _side(
        {
            "a": {"grad_norm": 1.0},
            "b": {"attn_max_logit": 4.0, "grad_norm": 1.0},
            "c": {"log_z": 4.0, "grad_norm": 1.0},
        },
        fwd,
    )
    spike = _side(
        {
            "a": {"grad_norm": 9.0},
            "b": {"attn_max_logit": 9.0, "grad_norm": 1.0},
            "c": {"log_z": 4.1, "grad_norm": 1.5},
        },
        fwd,
    )
    out = compare(healthy, spike)
    # a's gradient norm moved more, but the attention of b moved before any backward
    assert (
        out["moved_first"]["layer"] == "b" and out["moved_first"]["statistic"] == "attn_max_logit"
    )
    assert [r["layer"] for r in out["table"]] == fwd
    # without the attention move: the gradients in backward order (c, b, a) -> a
    spike["stats"]["b"]["attn_max_logit"] = 5.0
    assert compare(healthy, spike)["moved_first"]["layer"] == "a"
    spike["stats"]["a"]["grad_norm"] = 1.9
    assert compare(healthy, spike)["moved_first"] is None
    spike["stats"]["c"]["grad_norm"] = math.nan
    assert compare(healthy, spike)["moved_first"]["layer"] == "c"


def test_layers_are_blocks_and_top_level_modules():
    assert layer_names(TinyGPT()) == ["embed", "pos", "blocks.0", "blocks.1", "norm_f", "lm_head"]
    nested = torch.nn.Sequential()
    nested.add_module("transformer", torch.nn.Module())
    nested.transformer.h = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    nested.transformer.wte = torch.nn.Embedding(3, 2)
    nested.add_module("head", torch.nn.Linear(2, 3))
    assert layer_names(nested) == ["transformer.h.0", "transformer.wte", "head"]
