"""The reference trainer supplies loss_fn (``reference_model.step.step_loss``) and its micro-
batches: a run whose learning rate makes the weights overflow is replayed with the trainer's
own loss and named a ``state`` cause."""

from __future__ import annotations

import pytest

from reference_model.callbacks import attach_monitor
from reference_model.config import ModelConfig, TrainConfig
from reference_model.train import train


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model=ModelConfig(d_model=16, n_heads=2, n_layers=2, max_seq_len=16),
        batch_size=4,
        grad_accum=2,
        steps=12,
        warmup_steps=0,
        eval_every=0,
        eval_batches=1,
        data_max_bytes=100_000,
        device="cpu",
        quiet=True,
        log_every=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("lr", [3e-3, 1e4])
def test_reference_trainer_replays_with_its_own_loss(tmp_path, lr: float) -> None:
    cfg = _cfg(tmp_path, lr=lr, grad_clip=0.0)
    cb = attach_monitor(cfg, tmp_path / "run", quiet=True, forensics=True)
    assert cb is not None
    with cb:
        train(cfg, [cb])
    fx = [f.evidence["forensics"] for f in cb.mon.findings if "forensics" in f.evidence]
    if lr < 1:  # healthy: nothing replayed
        assert fx == [] and cb.mon.forensics.replays == 0
        return
    assert fx and fx[0]["reason"] is None and fx[0]["cause"] in ("state", "data")
    assert fx[0]["step"] is not None and fx[0]["direction"] in ("forward", "backward")
