"""The Monitor's forward when the loop calls a child of the module it was given
(tdiag/monitor/forwardsite.py): a wrapper passed to ``Monitor(model=...)`` whose ``net``
the loop calls gets the same forward-based metrics as the net itself."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tdiag import Monitor
from tdiag.monitor.forwardsite import ForwardSite, top_level_modules
from tdiag.monitor.timing import ForwardTimer

from .conftest import ListSink, TinyGPT, lm_loss, make_batch, quiet_options


class Wrapper(nn.Module):
    """Holds the network and a loss module; its own forward is never called by the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyGPT()
        self.loss = nn.CrossEntropyLoss()


def _run(tmp_path, wrapped: bool, **kw):
    torch.manual_seed(0)
    root = Wrapper()
    net = root.net
    opt = torch.optim.AdamW(root.parameters(), lr=1e-3)
    sink = ListSink()
    opts = quiet_options(tmp_path / ("w" if wrapped else "n"), log_every=2, peak_flops=1e12, **kw)
    loss_fn = root.loss if wrapped else nn.functional.cross_entropy
    with Monitor(root if wrapped else net, opt, sinks=[sink], **opts) as mon:
        for step in range(1, 7):
            ids = make_batch(step)
            logits = net(ids)[:, :-1]  # then the wrapper's loss module: a second child
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss, tokens=ids.numel())
    return sink, mon


def test_a_wrapper_whose_child_the_loop_calls_gets_the_forward_metrics(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="tdiag.monitor.forwardsite"):
        wrapped, mon = _run(tmp_path, True, watch="layers")
    plain, plain_mon = _run(tmp_path, False, watch="layers")
    keys = lambda sink: {k.replace("net.", "") for _, m in sink.rows for k in m}  # noqa: E731
    assert keys(wrapped) - {"act_rms/net"} == keys(plain)  # the net is a layer of the wrapper
    for key in ("perf/data_time", "perf/mfu", "attn/entropy/blocks.0", "logits/max_abs"):
        assert key in keys(wrapped), key
    assert all(v > 0 for _, v in wrapped.series("perf/mfu"))
    assert mon.perf_info["seq_len"] == plain_mon.perf_info["seq_len"] == 16
    assert mon._site.mode == "children" and mon._site.chosen == ["net", "loss"]
    assert plain_mon._site.mode == "root"
    assert any("'net'" in r.getMessage() for r in caplog.records)
    assert wrapped.series("train/loss") == plain.series("train/loss")
    assert wrapped.series("attn/entropy/net.blocks.0") == plain.series("attn/entropy/blocks.0")


def test_loop_checks_see_the_childs_forward(tmp_path):
    """``data.repeated-batch`` reads the forward's input ids: found through the child."""
    torch.manual_seed(0)
    root = Wrapper()
    opt = torch.optim.AdamW(root.parameters(), lr=1e-3)
    with Monitor(root, opt, **quiet_options(tmp_path, log_every=2)) as mon:
        for _ in range(4):
            ids = make_batch(0)  # the same batch every step
            loss = lm_loss(root.net(ids), ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss, tokens=ids.numel())
    assert "data.repeated-batch" in [f.id for f in mon.findings]
    _, ok = _run(tmp_path, True)
    assert "data.repeated-batch" not in [f.id for f in ok.findings]


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 8)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Nested(nn.Module):
    """A child whose forward calls its sibling (a shared module registered at the top)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.outer = _CallsShared(self.shared)


class _CallsShared(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self._shared = [shared]  # not registered here

    def forward(self, x):
        return self._shared[0](self.inner(x))


def test_top_level_modules_look_through_containers():
    assert [n for n, _ in top_level_modules(Seq())] == ["emb", "blocks.0", "blocks.1", "head"]


def test_children_called_in_sequence_are_forwards_and_nested_calls_one():
    starts, pairs = [], []
    model = Seq()
    site = ForwardSite(model, lambda m, a, k: starts.append(m))
    site.listen(lambda m, a: pairs.append(("pre", m)), lambda m, a, o: pairs.append(("post", m)))
    x = model.emb(torch.zeros(2, 3, dtype=torch.long))
    for b in model.blocks:
        x = b(x)
    model.head(x)
    assert site.mode == "children" and site.chosen == ["emb", "blocks.0", "blocks.1", "head"]
    assert len(starts) == 4 and [p for p, _ in pairs] == ["pre", "post"] * 4

    nested = Nested()
    starts.clear()
    site2 = ForwardSite(nested, lambda m, a, k: starts.append(m))
    nested.outer(torch.zeros(1, 4))  # calls `shared` inside: one forward
    assert starts == [nested.outer] and site2.chosen == ["outer"]


def test_the_roots_forward_decides_and_removes_the_child_hooks():
    model = Seq()
    calls = []
    site = ForwardSite(model, lambda m, a, k: calls.append(m))
    with torch.no_grad():  # an evaluation forward of a child does not decide
        model.head(torch.zeros(1, 4))
    assert site.mode == "probing" and len(calls) == 1
    model(torch.zeros(2, 3, dtype=torch.long))
    assert site.mode == "root" and calls[-1] is model and len(calls) == 2
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.children())
    model.head(torch.zeros(1, 4))
    assert len(calls) == 2  # children no longer watched
    site.remove()
    assert not model._forward_pre_hooks


class NoHooks(nn.Linear):
    """As a ScriptModule: ``register_forward_pre_hook is not supported on ScriptModules``."""

    def register_forward_pre_hook(self, *args, **kwargs):
        raise RuntimeError("register_forward_pre_hook is not supported on ScriptModules")


def test_a_child_that_takes_no_hooks_is_skipped():
    root = nn.Module()
    root.scripted, root.b = NoHooks(2, 2), nn.Linear(2, 2)
    starts = []
    ForwardSite(root, lambda m, a, k: starts.append(m))  # no error
    root.scripted(torch.zeros(1, 2))
    root.b(torch.zeros(1, 2))
    assert starts == [root.b]


def test_a_forward_that_raised_does_not_block_the_next_step():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    root = nn.Module()
    root.a, root.b = Boom(), nn.Linear(2, 2)
    starts = []
    site = ForwardSite(root, lambda m, a, k: starts.append(m))
    with pytest.raises(RuntimeError):
        root.a(torch.zeros(1))
    site.end_step()
    root.b(torch.zeros(1, 2))
    assert starts == [root.a, root.b]


def test_forward_timer_times_the_childs_forwards():
    model = Seq()
    site = ForwardSite(model, lambda m, a, k: None)
    timer = ForwardTimer(model, site=site)
    timer.arm()
    model.head(model.emb(torch.zeros(2, 3, dtype=torch.long)))
    seconds = timer.seconds()
    assert seconds is not None and seconds > 0
    timer.arm()
    assert timer.seconds() is None  # armed, no forward: none
