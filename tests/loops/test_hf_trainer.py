"""A real ``transformers.Trainer`` with ``TdiagCallback``: tdiag's history against what the
Trainer itself logs (``trainer.state.log_history``) at the same steps.

What transformers (5.x, the version in .venv) logs, read from ``Trainer._inner_training_loop``:

- ``grad_norm``: the return value of ``accelerator.clip_grad_norm_(params, max_grad_norm)``
  (``max_grad_norm=0``: the same call with ``inf``), i.e. the PRE-clip norm of the whole
  accumulated gradient, taken after the last micro-batch's backward and before
  ``on_pre_optimizer_step``. Only the log step's norm is kept.
- ``learning_rate``: ``_get_learning_rate()`` (the scheduler's ``get_last_lr()[0]``) read right
  after ``optimizer.step()`` and BEFORE ``lr_scheduler.step()`` ("get learning rate before
  update"): the LR that step used. Releases that did not do this read it at log time, after the
  scheduler had stepped: the NEXT step's LR. Either way the ground truth here is our own
  callback reading ``optimizer.param_groups[0]["lr"]`` in ``on_pre_optimizer_step``; the test
  checks that HF's log is that LR (or, on such a release, the next step's), and that tdiag's
  is exactly that LR. With ``warmup_steps=2`` and a linear schedule step 1 uses LR 0.0 (HF's
  warmup starts at 0), and the LR changes on every step, so an off-by-one shows.
- ``loss``: the sum, in a float32 tensor, of ``training_step``'s return values since the last
  log, divided by the number of optimizer steps in between. Each micro-batch's value is the
  model's loss divided by the whole batch's label count (``num_items_in_batch``), so the sum
  over micro-batches is the step's token-weighted loss. tdiag's adapter sums the same float32
  micro-batch losses with ``torch.sum`` instead of one ``+=`` at a time, so with accumulation
  the two may differ in the last bits of a float32 (accumulation 1: one value, exact).
"""

from __future__ import annotations

import pytest

from .helpers import assert_no_mismatch, grad_norm, history_rows, mismatch, quiet_options, series

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.hf

VOCAB, SEQ = 64, 16
F32_ROUNDING = 2.0**-21  # 4 float32 ulps, relative


def _dataset(n: int):
    import torch

    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    class Ids(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": ids[i]}

    return Ids()


def _truth_callback():
    from transformers import TrainerCallback

    class Truth(TrainerCallback):
        """What the optimizer step really used: its LR and (after HF's clipping) its gradient."""

        def __init__(self) -> None:
            self.lr: dict[int, float] = {}
            self.post_clip: dict[int, float] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            step = state.global_step + 1  # global_step counts the finished optimizer steps
            self.lr[step] = optimizer.param_groups[0]["lr"]
            self.post_clip[step] = grad_norm(model.parameters())

    return Truth()


def _train(tmp_path, *, max_grad_norm: float, accum: int, logging_steps: int = 1, steps: int = 6):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tdiag.integrations.huggingface import TdiagCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_grad_norm=max_grad_norm,
        logging_steps=logging_steps,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    truth = _truth_callback()
    opts = quiet_options(tmp_path / "run")
    run_dir = opts.pop("run_dir")
    tdiag_cb = TdiagCallback(run_dir=str(run_dir), **opts)  # log_every = logging_steps
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(2 * accum * steps),
        callbacks=[tdiag_cb, truth],
    )
    trainer.train()
    hf = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    return history_rows(run_dir), hf, truth


def _hf(hf_logs: list[dict], key: str) -> dict[int, float]:
    return {int(h["step"]): float(h[key]) for h in hf_logs}


def _hf_lr_is_of(hf_lr: dict[int, float], lr: dict[int, float]) -> str:
    if all(hf_lr[s] == lr[s] for s in hf_lr):
        return "this step"
    if all(hf_lr[s] == lr.get(s + 1, hf_lr[s]) for s in hf_lr):
        return "the next step"
    return "neither"


@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05], ids=["no-clip", "clip"])
def test_history_matches_the_trainers_log_every_step(tmp_path, max_grad_norm, accum):
    rows, hf, truth = _train(tmp_path, max_grad_norm=max_grad_norm, accum=accum)
    steps = list(range(1, 7))
    assert sorted(_hf(hf, "loss")) == steps  # logging_steps=1: HF logged every step
    assert [s for s in steps if s in rows] == steps
    # The premise: our ground-truth LR is the schedule HF logs (see the module docstring).
    assert _hf_lr_is_of(_hf(hf, "learning_rate"), truth.lr) in ("this step", "the next step")
    if max_grad_norm:  # clipping really happened: the pre-clip norms are far above 0.05
        assert min(_hf(hf, "grad_norm").values()) > 10 * max_grad_norm
    assert_no_mismatch(
        # the pre-clip norm of the whole accumulated gradient, measured by tdiag on its own
        mismatch(
            "train/grad_norm", series(rows, "train/grad_norm"), _hf(hf, "grad_norm"), rel=1e-5
        ),
        # the norm of the gradient the optimizer step used (= the pre-clip one without clipping)
        mismatch(
            "train/grad_norm_post_clip",
            series(rows, "train/grad_norm_post_clip"),
            truth.post_clip,
            rel=1e-5,
        ),
        mismatch("train/lr", series(rows, "train/lr"), truth.lr),  # exact
        mismatch(
            "train/loss",
            series(rows, "train/loss"),
            _hf(hf, "loss"),
            rel=0.0 if accum == 1 else F32_ROUNDING,
        ),
    )


def test_history_matches_over_a_logging_interval(tmp_path):
    """logging_steps=3: HF averages the loss over steps 4-6; the Monitor's row 6 covers the
    same interval (its row 3 covers 2-3: step 1 has a row of its own)."""
    rows, hf, truth = _train(tmp_path, max_grad_norm=0.05, accum=4, logging_steps=3)
    assert sorted(_hf(hf, "loss")) == [3, 6]
    assert [s for s in (1, 3, 6) if s in rows] == [1, 3, 6]
    assert_no_mismatch(
        mismatch(
            "train/grad_norm", series(rows, "train/grad_norm"), _hf(hf, "grad_norm"), rel=1e-5
        ),
        mismatch("train/lr", series(rows, "train/lr"), {s: truth.lr[s] for s in (1, 3, 6)}),
        # HF: a float32 sum of the 3 steps' losses, / 3; tdiag: the float64 sum of the same
        # float32 step losses, / 3 (and each step's sum over micro-batches, see above)
        mismatch("train/loss", series(rows, "train/loss"), _hf(hf, "loss"), rel=1e-6, steps=[6]),
    )
