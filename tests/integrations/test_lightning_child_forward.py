"""A ``training_step`` that calls a child (``self.model(ids)``), never ``self(...)``: the
LightningModule's own forward never runs, and the Monitor's forward-based measurements
(data time, MFU's sequence length, the forward-based loop checks) come from the child's
forward instead (tdiag/monitor/forwardsite.py), as they do in the ``self(...)`` style."""

import logging

import pytest
import torch
from torch import nn

from tdiag.history import read_history

L = pytest.importorskip("lightning")

V, T = 32, 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.emb(ids)))


class Lit(L.LightningModule):
    def __init__(self, style: str, eval_from: int | None = None) -> None:
        super().__init__()
        self.style, self.eval_from = style, eval_from
        self.model = Net()
        self.loss_fn = nn.CrossEntropyLoss()  # a second child, called after the model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, batch, batch_idx):
        if self.eval_from is not None and batch_idx + 1 == self.eval_from:
            self.model.eval()  # the bug: left in eval mode, dropout off in training
        (ids,) = batch
        x = ids[:, :-1]
        logits = self(x) if self.style == "self" else self.model(x)
        return self.loss_fn(logits.reshape(-1, V), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(tmp_path, style, *, eval_from=None, repeat=False, steps=6):
    from tdiag.integrations.lightning import TdiagLightningCallback

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1 if repeat else 4 * steps, T + 1), generator=g)
    if repeat:  # the same batch every step
        ids = ids.repeat(4 * steps, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    cb = TdiagLightningCallback(
        run_dir=str(tmp_path / style),
        log_every=2,
        tensorboard=False,
        system=False,
        report=False,
        handle_signals=False,
        peak_flops=1e12,
    )
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Lit(style, eval_from), data)
    df, _ = read_history(tmp_path / style)
    return df, cb.monitor


@pytest.mark.parametrize("style", ["self", "child"])
def test_data_time_mfu_and_eval_mode_check_work_in_both_styles(tmp_path, style, caplog):
    with caplog.at_level(logging.DEBUG, logger="tdiag.monitor.forwardsite"):
        df, mon = _fit(tmp_path, style, eval_from=3)
    train = df.dropna(subset=["train/loss"])
    later = train[train["step"] > 1]
    assert later["perf/data_time"].notna().all() and (later["perf/data_time"] > 0).all()
    assert train["perf/mfu"].notna().all() and (train["perf/mfu"] > 0).all()
    assert mon.perf_info["seq_len"] == T  # read from the forward's input
    ids = [f.id for f in mon.findings]
    assert "loop.eval-mode-training" in ids
    finding = next(f for f in mon.findings if f.id == "loop.eval-mode-training")
    assert finding.where == "model.drop" and finding.step == 4
    chose = [r.getMessage() for r in caplog.records if "stand for the model's" in r.getMessage()]
    assert mon._site.mode == ("root" if style == "self" else "children")
    assert bool(chose) == (style == "child")
    if style == "child":
        assert "'model'" in chose[0] and mon._site.chosen == ["model", "loss_fn"]


@pytest.mark.parametrize("style", ["self", "child"])
def test_no_eval_mode_finding_without_the_bug(tmp_path, style):
    _, mon = _fit(tmp_path, style)
    assert "loop.eval-mode-training" not in [f.id for f in mon.findings]
    assert "data.repeated-batch" not in [f.id for f in mon.findings]


def test_repeated_batch_is_found_when_training_step_calls_a_child(tmp_path):
    _, mon = _fit(tmp_path, "child", repeat=True)
    assert "data.repeated-batch" in [f.id for f in mon.findings]


def test_both_styles_log_the_same_metrics_and_losses(tmp_path):
    a, _ = _fit(tmp_path, "self")
    b, _ = _fit(tmp_path, "child")
    assert sorted(a.columns) == sorted(b.columns)
    ta, tb = a.dropna(subset=["train/loss"]), b.dropna(subset=["train/loss"])
    assert ta["step"].tolist() == tb["step"].tolist()
    assert ta["train/loss"].tolist() == tb["train/loss"].tolist()
