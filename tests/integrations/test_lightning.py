import pytest

from tdiag.history import read_history

L = pytest.importorskip("lightning")


def test_lightning_callback_steps_once_per_optimizer_step(tmp_path):
    import torch
    from torch import nn

    from tdiag.integrations.lightning import TdiagLightningCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.head = nn.Linear(16, 32)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self.head(self.emb(ids[:, :-1]))
            return nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    ids = torch.randint(0, 32, (64, 9), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    cb = TdiagLightningCallback(
        run_dir=str(tmp_path / "run"), log_every=2, tensorboard=False, system=False, report=False
    )
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=4,
        limit_val_batches=2,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Tiny(), data, data)
    df, _ = read_history(tmp_path / "run")
    train = df.dropna(subset=["train/loss"])
    assert train["step"].max() == 6  # one Monitor step per optimizer step, not per micro-batch
    assert 2.0 < train["train/loss"].iloc[0] < 4.5  # ~ln(32) at the start
    assert df["val/loss"].notna().any()


def test_lightning_resume_continues_the_monitors_steps(tmp_path):
    import torch
    from torch import nn

    from tdiag.integrations.lightning import TdiagLightningCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.head = nn.Linear(16, 32)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self.head(self.emb(ids[:, :-1]))
            return nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    ids = torch.randint(0, 32, (64, 9), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)

    def fit(max_steps, ckpt_path=None):
        cb = TdiagLightningCallback(
            run_dir=str(tmp_path / "run"),
            log_every=2,
            tensorboard=False,
            system=False,
            report=False,
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
        return trainer, cb

    trainer, cb = fit(4)
    trainer.save_checkpoint(tmp_path / "at4.ckpt")
    assert cb.monitor.global_step == 4
    _, cb2 = fit(8, ckpt_path=str(tmp_path / "at4.ckpt"))
    assert cb2.monitor.global_step == 8  # counted on from 4, not from 1
    df, stats = read_history(tmp_path / "run")
    train = df.dropna(subset=["train/loss"])
    assert train["step"].tolist() == [1, 2, 4, 6, 8] and stats.superseded == 0
    assert (df["run/restart"] == 4.0).sum() == 1
