"""With forensics=True the per-step path still does no host sync, and a healthy log step
(snapshot or not) still does exactly one: keeping batches, RNG states and snapshots costs
no sync (the same tensor-method counting as tests/monitor/test_sync_free.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import tdiag
from tdiag import Monitor
from tests.forensics.runs import TinyNet, loss_fn, make_batch

TDIAG_DIR = str(Path(tdiag.__file__).parent)
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_no_host_sync_between_log_steps_with_forensics(tmp_path, monkeypatch) -> None:
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
    model = TinyNet(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_step: dict[int, list[str]] = {}
    opts = dict(console=False, system=False, tensorboard=False, report=False, log_every=5)
    with Monitor(
        model, opt, run_dir=str(tmp_path), forensics=True, loss_fn=loss_fn, snapshot_every=5, **opts
    ) as mon:
        seen = len(calls)
        for step in range(1, 17):
            batch = make_batch(step)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss, batch=batch)
            per_step[step], seen = calls[seen:], len(calls)
    assert mon.keeper.snapshots_taken == 4  # step 0, 5, 10, 15
    for step, made in per_step.items():
        if step == 1 or step % 5 == 0:
            assert len(made) == 1 and made[0].startswith("tolist"), (step, made)
        else:
            assert made == [], (step, made)
