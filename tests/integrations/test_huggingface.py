import pytest

from tdiag.history import read_history

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.hf


class _Ids:
    def __init__(self, n, seq, vocab):
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_callback_writes_history_and_val_loss(tmp_path, capfd):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tdiag.integrations.huggingface import TdiagCallback

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    cb = TdiagCallback(run_dir=str(tmp_path / "run"), tensorboard=False, system=False, report=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Ids(48, 16, 64),
        eval_dataset=_Ids(8, 16, 64),
        callbacks=[cb],
    )
    trainer.train()
    df, _ = read_history(tmp_path / "run")
    train = df.dropna(subset=["train/loss"])
    assert train["step"].max() == 6
    # the tapped loss is the model's own loss: near ln(64) for a fresh model
    assert 3.0 < train["train/loss"].iloc[0] < 5.0
    # 2 micro-batches x 4 sequences x 16 tokens per optimizer step
    assert train["perf/tokens_per_sec"].notna().all()
    assert df["val/loss"].notna().sum() == 2
    assert cb._tap is None  # hooks removed at the end
    assert not model._forward_hooks and not model._forward_pre_hooks
    # the run does not end in silence: one line says where the run went (no report asked)
    line = f"tdiag: run recorded in {tmp_path / 'run'}; no report.html"
    assert capfd.readouterr().err.count(line) == 1


def test_trainer_resume_from_checkpoint_continues_the_monitors_steps(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tdiag.integrations.huggingface import TdiagCallback

    def fit(max_steps, resume=None):
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            logging_steps=2,
            report_to=[],
            use_cpu=True,
            save_strategy="steps",
            save_steps=4,
            disable_tqdm=True,
        )
        cb = TdiagCallback(
            run_dir=str(tmp_path / "run"), tensorboard=False, system=False, report=False
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Ids(48, 16, 64), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb

    assert fit(4).monitor.global_step == 4
    cb = fit(8, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert cb.monitor.global_step == 8  # counted on from the checkpoint's step, not from 1
    df, stats = read_history(tmp_path / "run")
    train = df.dropna(subset=["train/loss"])
    assert train["step"].tolist() == [1, 2, 4, 6, 8] and stats.superseded == 0
    assert (df["run/restart"] == 4.0).sum() == 1
