"""The HF Trainer and Lightning adapters supply ``loss_fn`` and the batch: a backward-only
NaN in a real Trainer run is replayed and named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.forensics.runs import D, NormGate


class _Rows(torch.utils.data.Dataset):
    """48 (x, y) rows; row 13 is all zeros (NormGate's sqrt backward is NaN there)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, D, generator=g)
        self.x[13] = 0.0
        self.y = torch.randn(48, 1, generator=g)

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D, bias=False)
        self.gate = NormGate()
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.out(self.gate(self.inp(x))), y)}


def _fx(monitor) -> dict:
    found = [f.evidence["forensics"] for f in monitor.findings if "forensics" in f.evidence]
    assert found, [f.id for f in monitor.findings]
    return found[0]


@pytest.mark.hf
def test_hf_trainer_replays_with_compute_loss_default(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from tdiag.integrations.huggingface import TdiagCallback

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        logging_steps=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    cb = TdiagCallback(
        run_dir=str(tmp_path / "run"),
        tensorboard=False,
        system=False,
        report=False,
        forensics=True,
        snapshot_every=4,
    )
    Trainer(model=_Net(), args=args, train_dataset=_Rows(), callbacks=[cb]).train()
    fx = _fx(cb.monitor)
    assert fx["module"] == "gate" and fx["direction"] == "backward" and fx["cause"] == "data"
    assert fx["op"].startswith("sqrt") and 1 <= fx["step"] <= 12


class _Plain(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = _Rows()

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rows[i]
        return r["x"], r["y"]


def test_lightning_replays_the_training_step(tmp_path) -> None:
    L = pytest.importorskip("lightning")
    from tdiag.integrations.lightning import TdiagLightningCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.net(x, y)["loss"]
            self.log("train_loss", loss)  # dropped in the replay's copy (no trainer)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(_Plain(), batch_size=4)  # row 13: step 4
    cb = TdiagLightningCallback(
        run_dir=str(tmp_path / "run"),
        log_every=5,
        tensorboard=False,
        system=False,
        report=False,
        forensics=True,
        snapshot_every=5,
    )
    trainer = L.Trainer(
        max_steps=8,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Module(), data)
    fx = _fx(cb.monitor)
    assert (fx["step"], fx["module"], fx["direction"], fx["cause"]) == (
        4,
        "net.gate",
        "backward",
        "data",
    )
