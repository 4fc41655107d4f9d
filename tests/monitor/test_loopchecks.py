"""Loop checks (tdiag/monitor/loopchecks.py): each id on a real loop that has the bug, and
quiet on correct loops that look like it. No mock of torch or of the optimizer."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tdiag.monitor import Monitor

from .conftest import ListSink, TinyGPT, lm_loss, make_batch, quiet_options

STEPS, LOG_EVERY = 8, 2


class DropGPT(TinyGPT):
    """TinyGPT with dropout after the embedding (the train/eval mode matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids) + self.pos(torch.arange(ids.shape[1])))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


class BNGPT(TinyGPT):
    """TinyGPT with a batch norm on the embedding, frozen (eval mode, no grad) on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(32)
        for p in self.bn.parameters():
            p.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def run(tmp_path, body, *, model=None, opt=None, steps=STEPS, config=None, **options):
    """Train ``steps`` steps; ``body(step, model, opt, mon) -> (loss, ids)`` does everything
    but ``mon.step()``. Returns (finding ids, findings, sink)."""
    torch.manual_seed(0)
    model = model or TinyGPT()
    opt = opt(model) if callable(opt) else torch.optim.AdamW(model.parameters(), lr=1e-3)
    sink = ListSink()
    opts = quiet_options(tmp_path, **{"log_every": LOG_EVERY, **options})
    with Monitor(model, opt, sinks=[sink], config=config, **opts) as mon:
        for step in range(1, steps + 1):
            loss, ids = body(step, model, opt, mon)
            mon.step(loss, tokens=ids.numel())
    return [f.id for f in mon.findings], mon.findings, sink


def fwd(model, step):
    ids = make_batch(step)
    return lm_loss(model(ids), ids), ids


# ------------------------------------------------------------------ loop.grad-accumulating
def never_cleared(step, model, opt, mon):
    loss, ids = fwd(model, step)
    loss.backward()
    opt.step()
    return loss, ids


def cleared_before_forward(step, model, opt, mon):
    opt.zero_grad()
    loss, ids = fwd(model, step)
    loss.backward()
    opt.step()
    return loss, ids


def cleared_between_forward_and_backward(step, model, opt, mon):
    loss, ids = fwd(model, step)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return loss, ids


def cleared_after_step_to_zero(step, model, opt, mon):
    loss, ids = fwd(model, step)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss, ids


def accumulated_four(step, model, opt, mon):
    for micro in range(4):
        loss, ids = fwd(model, 10 * step + micro)
        (loss / 4).backward()
    opt.step()
    opt.zero_grad()
    return loss, ids


def test_grad_accumulating_fires_when_grads_are_never_cleared(tmp_path):
    ids, findings, _ = run(tmp_path, never_cleared)
    assert ids == ["loop.grad-accumulating"]
    (f,) = findings
    assert f.step == 2 and f.where and f.evidence["stale_grad_norm"] > 0
    assert f.evidence["params_with_stale_grad"] == len(list(TinyGPT().parameters()))


@pytest.mark.parametrize(
    "body",
    [
        cleared_before_forward,
        cleared_between_forward_and_backward,
        cleared_after_step_to_zero,
        accumulated_four,
    ],
)
def test_grad_accumulating_quiet_for_every_correct_placement(tmp_path, body):
    assert run(tmp_path, body)[0] == []


# ----------------------------------------------------- loop.params-not-in-optimizer
def plain(step, model, opt, mon):
    loss, ids = fwd(model, step)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss, ids


def test_params_not_in_optimizer_fires_on_a_head_replaced_after_the_optimizer(tmp_path):
    model = TinyGPT()

    def make_opt(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.lm_head = nn.Linear(32, 61, bias=False)  # the new head is in no param group
        return opt

    ids, findings, _ = run(tmp_path, plain, model=model, opt=make_opt)
    assert ids == ["loop.params-not-in-optimizer"]
    assert findings[0].where == "lm_head.weight" and findings[0].step == 1


def test_params_not_in_optimizer_quiet_for_frozen_and_grouped_params(tmp_path):
    def frozen(m):
        m.embed.weight.requires_grad_(False)
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def grouped(m):
        decay = [p for p in m.parameters() if p.dim() >= 2]
        rest = [p for p in m.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}])

    assert run(tmp_path / "a", plain, opt=frozen)[0] == []
    assert run(tmp_path / "b", plain, opt=grouped)[0] == []


# ---------------------------------------------------------- loop.params-not-updated
def test_params_not_updated_fires_on_a_group_with_lr_zero(tmp_path):
    def lr0_head(m):
        head = list(m.lm_head.parameters())
        rest = [p for n, p in m.named_parameters() if not n.startswith("lm_head")]
        return torch.optim.SGD([{"params": rest, "lr": 1e-2}, {"params": head, "lr": 0.0}])

    ids, findings, _ = run(tmp_path, plain, opt=lr0_head)
    assert ids == ["loop.params-not-updated"]
    f = findings[0]
    assert f.where == "lm_head.weight" and f.evidence["param_groups"] == [1]
    assert f.evidence["lrs"] == {1: 0.0} and f.step == 2  # two log steps in a row: 1 and 2


def test_params_not_updated_quiet_for_warmup_from_zero_and_small_lr(tmp_path):
    def warm(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, i / 3))
        opt.sched = sched
        return opt

    def warm_body(step, model, opt, mon):
        out = plain(step, model, opt, mon)
        opt.sched.step()
        return out

    assert run(tmp_path / "a", warm_body, opt=warm, log_every=1)[0] == []
    tiny = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-7)  # noqa: E731
    assert run(tmp_path / "b", plain, opt=tiny)[0] == []


# ------------------------------------------------ loop.eval-mode-training / train-mode-eval
def eval_never_back(step, model, opt, mon):
    if step == 3:  # validation, and model.train() forgotten
        model.eval()
        with torch.no_grad():
            fwd(model, 999)
    return plain(step, model, opt, mon)


def eval_and_back(step, model, opt, mon):
    if step == 3:
        model.eval()
        with torch.no_grad():
            fwd(model, 999)
        model.train()
    return plain(step, model, opt, mon)


def eval_in_train_mode(step, model, opt, mon):
    if step == 3:
        with torch.no_grad():  # model.eval() forgotten: dropout on in validation
            fwd(model, 999)
    return plain(step, model, opt, mon)


def test_eval_mode_training_fires_after_a_validation_that_never_switches_back(tmp_path):
    ids, findings, _ = run(tmp_path, eval_never_back, model=DropGPT())
    assert ids == ["loop.eval-mode-training"]
    assert findings[0].where == "drop" and findings[0].step == 4


def test_eval_mode_training_quiet_when_switched_back_or_bn_frozen_on_purpose(tmp_path):
    assert run(tmp_path / "a", eval_and_back, model=DropGPT())[0] == []

    def frozen_bn(step, model, opt, mon):
        model.bn.eval()  # frozen batch norm (fine-tuning): eval mode, no grad
        return plain(step, model, opt, mon)

    assert run(tmp_path / "b", frozen_bn, model=BNGPT())[0] == []
    # no dropout or batch statistics at all: eval mode changes nothing, nothing to say
    assert run(tmp_path / "c", eval_never_back, model=TinyGPT())[0] == []


def test_train_mode_eval_fires_on_validation_with_dropout_active(tmp_path):
    ids, findings, _ = run(tmp_path, eval_in_train_mode, model=DropGPT())
    assert ids == ["loop.train-mode-eval"]
    assert findings[0].where == "drop" and findings[0].step == 2  # after step 2, in step 3
    assert findings[0].severity.value == "warning"


def test_train_mode_eval_quiet_with_eval_mode_or_without_dropout(tmp_path):
    assert run(tmp_path / "a", eval_and_back, model=DropGPT())[0] == []
    assert run(tmp_path / "b", eval_in_train_mode, model=TinyGPT())[0] == []


# ----------------------------------------------------------- loop.optimizer-replaced
def test_optimizer_replaced_fires_when_the_loop_recreates_it(tmp_path):
    state = {}

    def recreated(step, model, opt, mon):
        state.setdefault("opt", opt)  # the first epoch steps the Monitor's optimizer...
        if step in (3, 5, 7):  # ...then "every epoch" a fresh one: Adam's moments lost
            state["opt"] = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return plain(step, model, state["opt"], mon)

    ids, findings, _ = run(tmp_path, recreated)
    assert ids == ["loop.optimizer-replaced"]
    assert findings[0].step == 4 and findings[0].evidence["steps_without_optimizer_step"] == 2


def test_optimizer_replaced_quiet_with_one_optimizer_and_added_groups(tmp_path):
    assert run(tmp_path / "a", plain)[0] == []

    def growing(step, model, opt, mon):
        if step == 3:  # a new group added to the same optimizer
            extra = nn.Parameter(torch.zeros(3))
            opt.add_param_group({"params": [extra]})
        return plain(step, model, opt, mon)

    assert run(tmp_path / "b", growing)[0] == []


# ------------------------------------------------------------------ loop.clip-after-step
def clip_after(step, model, opt, mon):
    loss, ids = fwd(model, step)
    loss.backward()
    opt.step()
    nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # too late
    opt.zero_grad()
    return loss, ids


def clip_before(step, model, opt, mon):
    loss, ids = fwd(model, step)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()
    opt.zero_grad()
    return loss, ids


def test_clip_after_step_fires_when_clipping_runs_after_the_step(tmp_path):
    ids, findings, _ = run(tmp_path, clip_after, config={"grad_clip": 0.05})
    assert ids == ["loop.clip-after-step"]
    f = findings[0]
    assert f.evidence["clip_threshold"] == 0.05 and f.evidence["max_ratio"] > 5
    assert f.evidence["log_steps_measured"] >= 3


def test_clip_after_step_quiet_when_clipping_before_or_no_threshold(tmp_path):
    assert run(tmp_path / "a", clip_before, config={"grad_clip": 0.05})[0] == []
    assert run(tmp_path / "b", clip_before, clip=0.05)[0] == []
    assert run(tmp_path / "c", plain)[0] == []  # no threshold known: nothing to compare


# -------------------------------------------------------------------- data.repeated-batch
def test_repeated_batch_fires_on_next_iter_loader_inside_the_loop(tmp_path):
    loader = torch.utils.data.DataLoader(
        torch.stack([make_batch(i)[0] for i in range(16)]), batch_size=4, shuffle=False
    )

    def same_first_batch(step, model, opt, mon):
        ids = next(iter(loader))  # a fresh iterator every step: always the first batch
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss, ids

    ids, findings, _ = run(tmp_path, same_first_batch)
    assert ids == ["data.repeated-batch"] and findings[0].evidence["steps"] == [1, 2]
    assert run(tmp_path / "ok", same_first_batch, ignore=["data.repeated-batch"])[0] == []


def test_repeated_batch_quiet_for_a_loader_iterated_and_a_two_batch_cycle(tmp_path):
    data = torch.stack([make_batch(i)[0] for i in range(8)])
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    batches = itertools.cycle(loader)  # batches A, B, A, B, ...: never the same one twice

    def cycled(step, model, opt, mon):
        ids = next(batches)
        loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss, ids

    assert run(tmp_path / "a", plain)[0] == []
    assert run(tmp_path / "b", cycled)[0] == []


def test_ignore_rejects_unknown_ids(tmp_path):
    with pytest.raises(ValueError, match=r"loop\.nope"):
        Monitor(TinyGPT(), **quiet_options(tmp_path, ignore=["loop.nope"]))


# ---------------------------------------------------------------------- data.pad-in-loss
def _hf_pad_run(tmp_path, *, mask_labels: bool, pad: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=61, n_positions=32)
    )

    def body(step, model, opt, mon):
        ids = make_batch(step, seq=16)
        mask = torch.ones_like(ids)
        if pad:
            mask[:, 12:] = 0  # right padding
            ids = ids.masked_fill(mask == 0, 0)
        labels = ids.clone()
        if mask_labels:
            labels[mask == 0] = -100
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss, ids

    return run(tmp_path, body, model=model)


@pytest.mark.hf
def test_pad_in_loss_fires_on_labels_that_keep_the_pad_id(tmp_path):
    ids, findings, _ = _hf_pad_run(tmp_path, mask_labels=False, pad=True)
    assert ids == ["data.pad-in-loss"]
    assert findings[0].evidence["pad_positions_in_loss"] == 4 * 4
    assert findings[0].evidence["fraction"] == 1.0


@pytest.mark.hf
def test_pad_in_loss_quiet_with_ignored_pads_or_no_padding(tmp_path):
    assert _hf_pad_run(tmp_path / "a", mask_labels=True, pad=True)[0] == []
    assert _hf_pad_run(tmp_path / "b", mask_labels=False, pad=False)[0] == []
