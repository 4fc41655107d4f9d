"""The per-step path of the Monitor does no host sync; a log step does exactly one.

Tensor methods that copy to the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``__float__``,
``__int__``, ``__bool__``) are patched to count the calls made *from tdiag's code* while a
real training loop runs. (torch's own optimizer may call ``.item()`` on its CPU step counter;
that is not ours, so calls are attributed by the calling frame's file.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tdiag
from tdiag import Monitor

from .conftest import quiet_options, train_loop

TDIAG_DIR = str(Path(tdiag.__file__).parent)
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def sync_counter(monkeypatch):
    calls: list[str] = []

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(TDIAG_DIR):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return counted

    for name in HOST_METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("watch", [None, "layers"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_no_host_sync_between_log_steps(tmp_path, tiny_gpt, sync_counter, watch, clip):
    log_every = 5
    per_step: dict[int, list[str]] = {}
    seen = [0]

    def on_step(step, model):
        per_step[step] = sync_counter[seen[0] :]
        seen[0] = len(sync_counter)

    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3)
    opts = quiet_options(tmp_path, log_every=log_every, watch=watch, config={"grad_clip": clip})
    with Monitor(tiny_gpt, opt, **opts) as mon:
        train_loop(tiny_gpt, mon, 17, opt=opt, clip=clip, on_step=on_step)
    for step, calls in per_step.items():
        if step == 1 or step % log_every == 0:
            assert len(calls) == 1 and calls[0].startswith("tolist"), (step, calls)
        else:
            assert calls == [], (step, calls)
    assert mon.last_metrics["train/loss"] > 0  # the log steps did log


def test_strict_mode_syncs_every_step(tmp_path, tiny_gpt, sync_counter):
    per_step: dict[int, int] = {}
    seen = [0]

    def on_step(step, model):
        per_step[step] = len(sync_counter) - seen[0]
        seen[0] = len(sync_counter)

    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-2)
    with Monitor(tiny_gpt, opt, **quiet_options(tmp_path, log_every=4, strict=True)) as mon:
        train_loop(tiny_gpt, mon, 6, opt=opt, on_step=on_step)
    assert per_step[2] == 1 and per_step[3] == 1  # the strict finiteness check
    assert per_step[4] == 2  # strict check + the log step's transfer


@pytest.mark.parametrize("fused", [False, True])
def test_no_host_sync_between_log_steps_with_a_grad_scaler(tmp_path, tiny_gpt, sync_counter, fused):
    from .conftest import lm_loss, make_batch

    log_every = 4
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # step 1 overflows: skipped
    per_step: dict[int, list[str]] = {}
    with Monitor(tiny_gpt, opt, **quiet_options(tmp_path, log_every=log_every)) as mon:
        for step in range(1, 10):
            ids = make_batch(step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = lm_loss(tiny_gpt(ids), ids)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            seen = len(sync_counter)
            mon.step(loss, tokens=ids.numel())
            per_step[step] = sync_counter[seen:]
    # Non-fused: step 1 was skipped with no optimizer.step() call, so the first row is written
    # at step 3, once steps 2 and 3 showed real steps (cadence.py) — one transfer there, none
    # at steps 1 and 2. Fused: optimizer.step() ran (skipping itself): step 1 is logged.
    first = 1 if fused else 3
    for step, calls in per_step.items():
        if step == first or step % log_every == 0:
            assert len(calls) == 1 and calls[0].startswith("tolist"), (step, calls)
        else:
            assert calls == [], (step, calls)
    assert mon.findings == []
    assert mon.last_metrics["train/skipped_steps"] == 0.0


@pytest.mark.parametrize("watch", [None, "layers"])
def test_no_host_sync_between_log_steps_when_the_loop_calls_a_child(
    tmp_path, tiny_gpt, sync_counter, watch
):
    """A wrapper given to the Monitor, its child called by the loop (forwardsite.py)."""
    from torch import nn

    wrapper = nn.Module()
    wrapper.net = tiny_gpt
    log_every = 4
    per_step: dict[int, list[str]] = {}
    seen = [0]

    def on_step(step, model):
        per_step[step] = sync_counter[seen[0] :]
        seen[0] = len(sync_counter)

    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3)
    with Monitor(wrapper, opt, **quiet_options(tmp_path, log_every=log_every, watch=watch)) as mon:
        train_loop(tiny_gpt, mon, 9, opt=opt, on_step=on_step)
    assert mon._site.mode == "children"
    for step, calls in per_step.items():
        if step == 1 or step % log_every == 0:
            assert len(calls) == 1 and calls[0].startswith("tolist"), (step, calls)
        else:
            assert calls == [], (step, calls)
    assert "perf/data_time" in mon.last_metrics
