"""A real ``lightning.Trainer`` with ``TdiagLightningCallback``: tdiag's history against what
Lightning's own hooks see at the same optimizer steps.

Lightning does not log a gradient norm or the LR by itself (that is what ``logger=False``
leaves out), so the ground truth comes from a callback of ours, at the points where Lightning
hands them over (``lightning/pytorch/plugins/precision/precision.py``,
``loops/optimization/automatic.py``, ``loops/training_epoch_loop.py``, Lightning 2.x):

- ``optimizer.step(closure)`` runs the closure INSIDE the torch optimizer's ``step()``: the
  last micro-batch's ``training_step`` and backward, then ``on_before_optimizer_step`` (the
  accumulated, unclipped gradients: our pre-clip norm and the optimizer's LR are read here),
  then clipping (``gradient_clip_val``), then the update. So a torch ``step_pre_hook`` fires
  BEFORE that backward, and a ``step_post_hook`` sees the clipped gradients the update used
  (our post-clip norm; the next ``zero_grad`` comes at the next step's first closure).
- The step's LR scheduler (``interval="step"``) steps before ``on_train_batch_end``: an
  adapter that reads ``param_groups[0]["lr"]`` there gets the NEXT step's LR. A LambdaLR
  warm-up changes the LR on every step so that shows.
- ``on_train_batch_end`` gets the loss divided by ``accumulate_grad_batches`` (what is
  back-propagated). Our reference is each micro-batch's own loss, recorded in
  ``training_step``: the step's loss is their mean. The adapter sums the divided float32
  losses on the device (÷4 is exact in binary, the float32 sum of 4 values is not), so
  with accumulation they agree to float32 rounding; without, exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from .helpers import (
    TinyGPT,
    assert_no_mismatch,
    batch,
    grad_norm,
    history_rows,
    lm_loss,
    mismatch,
    quiet_options,
    series,
    unless,
)

L = pytest.importorskip("lightning")

STEPS, LOG_EVERY, WARMUP = 8, 2, 10
F32_ROUNDING = 2.0**-21  # 4 float32 ulps, relative


class LitGPT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyGPT()
        self.micro_losses: list[tuple[int, float]] = []  # (optimizer step, micro-batch loss)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = lm_loss(self(ids), ids)
        self.micro_losses.append((self.trainer.global_step + 1, loss.item()))  # test: host sync
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / WARMUP)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class Truth(L.Callback):
    """The pre-clip norm and LR of each optimizer step, and the norm of the gradient it used."""

    def __init__(self) -> None:
        self.pre_clip: dict[int, float] = {}
        self.post_clip: dict[int, float] = {}
        self.lr: dict[int, float] = {}
        self._handle = None
        self._module = None

    def on_train_start(self, trainer, pl_module):
        self._module = pl_module
        self._handle = trainer.optimizers[0].register_step_post_hook(self._after_update)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1  # global_step counts the finished optimizer steps
        self.pre_clip[step] = grad_norm(pl_module.parameters())
        self.lr[step] = optimizer.param_groups[0]["lr"]

    def _after_update(self, optimizer, args, kwargs):
        self.post_clip[len(self.post_clip) + 1] = grad_norm(self._module.parameters())

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


def _fit(tmp_path, *, clip: float | None, accum: int):
    from tdiag.integrations.lightning import TdiagLightningCallback

    torch.manual_seed(0)
    module = LitGPT()
    ids = torch.cat([batch(i) for i in range(STEPS * accum)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    truth = Truth()
    opts = quiet_options(tmp_path / "run")
    run_dir = opts.pop("run_dir")
    tdiag_cb = TdiagLightningCallback(run_dir=str(run_dir), log_every=LOG_EVERY, **opts)
    trainer = L.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=accum,
        gradient_clip_val=clip,
        callbacks=[tdiag_cb, truth],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, data)
    meta = json.loads((run_dir / "meta.json").read_text())
    return history_rows(run_dir), truth, module.micro_losses, tdiag_cb.monitor, meta


def _interval_loss(micro: list[tuple[int, float]], log_steps: list[int]) -> dict[int, float]:
    """Per log row: the mean over its interval's optimizer steps of each step's loss (the
    mean of its micro-batch losses)."""
    per_step: dict[int, list[float]] = {}
    for step, loss in micro:
        per_step.setdefault(step, []).append(loss)
    step_loss = {s: math.fsum(v) / len(v) for s, v in per_step.items()}
    out, prev = {}, 0
    for s in log_steps:
        vals = [step_loss[k] for k in range(prev + 1, s + 1)]
        out[s], prev = math.fsum(vals) / len(vals), s
    return out


@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_history_matches_lightnings_own_hooks(tmp_path, clip, accum):
    rows, truth, micro, mon, meta = _fit(tmp_path, clip=clip, accum=accum)
    log_steps = [1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)]
    assert sorted(truth.pre_clip) == list(range(1, STEPS + 1))
    assert [s for s in rows if "train/loss" in rows[s]] == log_steps  # per optimizer step
    if clip:  # clipping really happened
        assert min(truth.pre_clip.values()) > 10 * clip
    post_clip = {s: truth.post_clip[s] for s in log_steps}
    assert_no_mismatch(
        mismatch(
            "train/grad_norm",
            series(rows, "train/grad_norm"),
            {s: truth.pre_clip[s] for s in log_steps},
            rel=1e-5,
        ),
        mismatch(
            "train/grad_norm_post_clip",
            series(rows, "train/grad_norm_post_clip"),
            post_clip,
            rel=1e-5,
        ),
        mismatch("train/lr", series(rows, "train/lr"), {s: truth.lr[s] for s in log_steps}),
        mismatch(
            "train/loss",
            series(rows, "train/loss"),
            _interval_loss(micro, log_steps),
            rel=0.0 if accum == 1 else F32_ROUNDING,
        ),
        # the clipping threshold is read from the Trainer
        unless(
            mon.clip == clip and meta["monitor"]["clip_used"] == clip,
            f"clip: Monitor.clip={mon.clip!r}, meta clip_used={meta['monitor']['clip_used']!r}, "
            f"gradient_clip_val={clip!r}",
        ),
        # the first optimizer step is measured like any log step
        unless(
            rows[1].get("train/update_ratio", 0.0) > 0.0,
            f"step 1 has no train/update_ratio: {rows[1].get('train/update_ratio')!r}",
        ),
    )
