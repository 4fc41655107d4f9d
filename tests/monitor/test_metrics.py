"""Each Monitor statistic against a naive reference computed directly from the tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tdiag import Monitor
from tdiag.monitor.distributed import combine, step_time_metrics
from tdiag.monitor.metrics import (
    DeviceBatch,
    IntervalAccumulator,
    IntervalSummary,
    learning_rates,
    summarize_interval,
)

from .conftest import ListSink, isclose, lm_loss, make_batch, quiet_options

LOG_EVERY = 4


def naive_loop(model, mon, steps, *, clip=None, log_every=LOG_EVERY, lr=1e-2):
    """A loop that also computes, with plain tensor code, what the Monitor should report."""
    opt = mon.optimizer
    ref: dict[int, dict] = {}
    losses: list[float] = []
    for step in range(1, steps + 1):
        ids = make_batch(step)
        acts = {}
        handles = [
            m.register_forward_hook(
                lambda mod, a, out, n=n, acts=acts: acts.__setitem__(n, out.detach())
            )
            for n, m in model.named_modules()
            if n in ("embed", "blocks.0.qkv", "blocks.1.fc2", "lm_head")
        ]
        logits = model(ids)
        for h in handles:
            h.remove()
        loss = lm_loss(logits, ids)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
        r = {"loss": loss.item()}
        losses.append(r["loss"])
        if step == 1 or step % log_every == 0:
            grads = [p.grad for p in model.parameters()]
            r["grad_norm"] = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))
            r["grad_norm/blocks.0.qkv"] = math.sqrt(
                model.blocks[0].qkv.weight.grad.double().pow(2).sum().item()
                + model.blocks[0].qkv.bias.grad.double().pow(2).sum().item()
            )
            r["grad_norm/lm_head"] = model.lm_head.weight.grad.double().norm().item()
            r["act_rms"] = {n: a.double().pow(2).mean().sqrt().item() for n, a in acts.items()}
            r["logits/max_abs"] = logits.detach().abs().max().item()
            r["logits/log_z"] = torch.logsumexp(logits.detach().double(), -1).mean().item()
            r["interval_losses"] = list(losses)
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == 1 or step % log_every == 0:
            after = list(model.parameters())
            num = sum(
                (a.detach() - b).double().pow(2).sum().item()
                for a, b in zip(after, before, strict=True)
            )
            den = sum(b.double().pow(2).sum().item() for b in before)
            r["update_ratio"] = math.sqrt(num) / math.sqrt(den)
            losses = []
        opt.zero_grad(set_to_none=True)
        mon.step(loss, tokens=ids.numel(), grad_norm=norm)
        r["pre_clip"] = None if norm is None else norm.item()
        ref[step] = r
    return ref


@pytest.fixture
def run(tmp_path, tiny_gpt):
    def _run(steps=9, **kw):
        sink = ListSink()
        groups = [
            {"params": [p for n, p in tiny_gpt.named_parameters() if "blocks" in n], "lr": 1e-2},
            {
                "params": [p for n, p in tiny_gpt.named_parameters() if "blocks" not in n],
                "lr": 3e-3,
            },
        ]
        opt = torch.optim.AdamW(groups)
        clip = kw.pop("clip", None)
        opts = quiet_options(tmp_path, log_every=LOG_EVERY, **kw)
        with Monitor(tiny_gpt, opt, sinks=[sink], **opts) as mon:
            ref = naive_loop(tiny_gpt, mon, steps, clip=clip)
        return {s: m for s, m in sink.rows}, ref

    return _run


def test_loss_grad_norm_update_ratio_lr(run):
    rows, ref = run()
    assert sorted(rows) == [1, 4, 8, 9]  # step 1, every 4, the last (partial) interval on close
    for step in (1, 4, 8):
        m, r = rows[step], ref[step]
        expected_loss = sum(r["interval_losses"]) / len(r["interval_losses"])
        assert isclose(m["train/loss"], expected_loss)
        assert isclose(m["train/loss_last"], r["loss"])
        assert isclose(m["train/grad_norm"], r["grad_norm"], rel=1e-4)
        assert isclose(m["train/update_ratio"], r["update_ratio"], rel=1e-3)
        assert m["train/lr"] == 1e-2 and m["train/lr/1"] == 3e-3
    assert rows[4]["train/tokens"] == 4 * 64 and rows[9]["train/tokens"] == 9 * 64
    # tokens/s and step time come from the same elapsed time: their product is tokens per step
    m = rows[8]
    assert isclose(m["perf/tokens_per_sec"] * m["perf/step_time"], 64.0, rel=1e-6)
    assert "train/update_ratio" not in rows[9]  # the final flush is not an armed step


def test_layer_statistics(run):
    rows, ref = run(watch="layers")
    for step in (1, 4, 8):
        m, r = rows[step], ref[step]
        assert isclose(m["grad_norm/blocks.0.qkv"], r["grad_norm/blocks.0.qkv"], rel=1e-4)
        assert isclose(m["grad_norm/lm_head"], r["grad_norm/lm_head"], rel=1e-4)
        for name, rms in r["act_rms"].items():
            assert isclose(m[f"act_rms/{name}"], rms, rel=1e-4), name
        assert isclose(m["logits/max_abs"], r["logits/max_abs"])
        assert isclose(m["logits/log_z"], r["logits/log_z"], rel=1e-5)
        for layer in ("blocks.0", "blocks.1"):
            assert 0 < m[f"attn/entropy/{layer}"] <= math.log(16)
            assert f"attn/max_logit/{layer}" in m
    assert not any(k.startswith("act_rms/") for k in rows[9])  # not armed for the final flush


def test_attention_entropy_against_naive(tmp_path, tiny_gpt):
    block = tiny_gpt.blocks[0]
    captured = {}
    block.qkv.register_forward_hook(lambda m, a, out: captured.__setitem__("qkv", out.detach()))
    sink = ListSink()
    with Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path, watch="layers")) as mon:
        ids = make_batch(1)
        lm_loss(tiny_gpt(ids), ids).backward()
        mon.step(torch.tensor(1.0))
    B, L, D = captured["qkv"].shape[0], captured["qkv"].shape[1], 32
    q, k, _ = captured["qkv"].split(D, dim=-1)
    q, k = (t.view(B, L, 2, D // 2).transpose(1, 2).double() for t in (q, k))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // 2)
    max_logit = scores.max().item()
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    p = scores.softmax(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
    m = sink.rows[0][1]
    assert isclose(m["attn/entropy/blocks.0"], entropy, rel=1e-4)
    assert isclose(m["attn/max_logit/blocks.0"], max_logit, rel=1e-4)
    # no optimizer: the gradient norm is measured from .grad at step()
    naive = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in tiny_gpt.parameters()))
    assert isclose(m["train/grad_norm"], naive, rel=1e-4)


def test_grad_clip_fraction_uses_the_pre_clip_norm(run):
    rows, ref = run(clip=0.5, config={"grad_clip": 0.5})
    norms = [ref[s]["pre_clip"] for s in (5, 6, 7, 8)]
    m = rows[8]
    assert m["train/grad_clip_frac"] == sum(n > 0.5 for n in norms) / 4
    assert isclose(m["train/grad_norm"], norms[-1]) and isclose(
        m["train/grad_norm_max"], max(norms)
    )


def test_clip_fraction_needs_a_threshold(run):
    rows, _ = run(clip=0.5)  # clipping, but the Monitor is not told the threshold
    assert "train/grad_clip_frac" not in rows[8]


def test_accumulator_float_and_tensor_inputs():
    acc = IntervalAccumulator(4)
    acc.add(torch.tensor([1.0, 3.0]), tokens=torch.tensor([[1, 1], [1, 0]]))  # per-token loss
    acc.add(4.0, tokens=5, grad_norm=2.0)
    acc.add(torch.tensor(float("nan")), grad_norm=torch.tensor(7.0))
    batch = DeviceBatch()
    acc.add_to(batch)
    host = batch.unpack([batch.pack().tolist()])
    s = acc.summary(host)
    assert s.losses[:2] == [2.0, 4.0] and math.isnan(s.losses[2])
    assert s.grad_norms[0] is None and s.grad_norms[1:] == [2.0, 7.0]  # None: not given
    assert host["acc/tokens"] == [3.0] and acc.tokens == 5
    with pytest.raises(ValueError, match="capacity"):
        IntervalAccumulator(0)


def test_summarize_interval_definitions():
    s = IntervalSummary(
        losses=[1.0, 2.0, 3.0], grad_norms=[0.5, 2.0, float("nan")], data_times=[0.1, 0.3]
    )
    m = summarize_interval(s, clip=1.0, tokens=300, elapsed=1.5)
    assert m["train/loss"] == 2.0 and m["train/loss_last"] == 3.0
    assert m["train/grad_clip_frac"] == 2 / 3  # 2.0 > 1 and NaN count as clipped
    assert math.isnan(m["train/grad_norm"]) and math.isnan(m["train/grad_norm_max"])
    assert m["perf/step_time"] == 0.5 and m["perf/tokens_per_sec"] == 200
    assert isclose(m["perf/data_time"], 0.2)


def test_combine_over_ranks_and_step_times():
    per_rank = [[1.0, 5.0], [3.0, float("nan")]]
    assert combine(per_rank, "mean")[0] == 2.0 and math.isnan(combine(per_rank, "mean")[1])
    assert combine(per_rank, "sum")[0] == 4.0
    assert combine(per_rank, "max")[0] == 3.0 and math.isnan(combine(per_rank, "max")[1])
    assert math.isnan(combine(per_rank, "min")[1])  # NaN wins whatever the rank order
    assert combine(per_rank, "rank0") == [1.0, 5.0]
    assert step_time_metrics([0.2, 0.5, 0.1]) == {
        "dist/step_time_max": 0.5,
        "dist/step_time_min": 0.1,
        "dist/slowest_rank": 1.0,
    }


def test_learning_rates_per_group():
    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": 0.1}, {"params": w[1:], "lr": 0.2}])
    assert learning_rates(opt) == {"train/lr": 0.1, "train/lr/1": 0.2}
    assert learning_rates(None) == {}


def test_data_time_is_time_before_the_next_forward(tmp_path, tiny_gpt):
    import time

    sink = ListSink()
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-2)
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=3)) as mon:
        for step in range(1, 7):
            time.sleep(0.03)  # the "data loader"
            ids = make_batch(step)
            loss = F.cross_entropy(tiny_gpt(ids).flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
    m = dict(sink.rows)[6]
    assert 0.03 <= m["perf/data_time"] < m["perf/step_time"]
