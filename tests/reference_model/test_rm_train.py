"""The training loop: accumulation, resume, DDP, learning, schedules, early stopping, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_model.config import ModelConfig
from reference_model.model import Transformer
from reference_model.train import (
    EarlyStopping,
    TrainConfig,
    build_batchers,
    evaluate,
    forward_backward,
    lr_lambda,
    main,
    param_groups,
    train,
)

REPO = Path(__file__).resolve().parents[2]
# Child processes import reference_model from this checkout (an install ships it as
# tdiag.reference_model only): the repository on their path, wherever they start.
CHILD_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}


def tiny_cfg(**kw) -> TrainConfig:
    model_kw = kw.pop("model", {})
    base = dict(
        model=ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, **model_kw),
        batch_size=8,
        steps=4,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        data_max_bytes=300_000,
        device="cpu",
        quiet=True,
    )
    return TrainConfig(**{**base, **kw})


class LossRecorder:
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor | None] = []
        self.events: list[str] = []

    def on_train_start(self, state) -> None:
        self.events.append("start")

    def on_step_end(self, state) -> None:
        self.losses.append(state.loss.detach().clone())
        self.grad_norms.append(state.grad_norm)
        self.events.append("step")

    def on_eval(self, state) -> None:
        self.events.append(f"eval {state.val_loss:.3f}")

    def on_train_end(self, state) -> None:
        self.events.append("end")


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            state.should_stop = True


@pytest.mark.parametrize("batching", ["chunks", "documents"])
def test_grad_accumulation_equals_full_batch(batching: str) -> None:
    """k micro-batches of B/k give the gradient of one batch of B (fp32, atol 1e-6)."""
    cfg = tiny_cfg(batching=batching, bucket=False)
    train_b, _ = build_batchers(cfg, 0, 1)
    batches = [train_b.batch(i) for i in range(2)]
    if batching == "documents":  # unequal lengths: re-pad to a common length
        from reference_model.data import pad_batch

        rows = [
            r[m.bool()]
            for b in batches
            for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]
        full = pad_batch(rows)
    else:
        full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    grads = []
    for micro in ([full], batches):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        loss = forward_backward(model, micro, label_smoothing=0.1)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
    assert grads[0][1].abs().max() > 1e-3  # gradients are not trivially zero


def test_trainer_accumulation_matches_full_batch_training() -> None:
    """Through the whole loop: 2 x 4 accumulated steps end where 8-sequence steps do."""
    a = train(tiny_cfg(batch_size=8, grad_accum=1, steps=3))
    b = train(tiny_cfg(batch_size=4, grad_accum=2, steps=3))
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-5)


def test_checkpoint_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = tiny_cfg(steps=6, model=dict(dropout=0.1), out_dir=str(tmp_path / "a"))
    whole = LossRecorder()
    train(cfg, [whole])
    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True)
    first = LossRecorder()
    r1 = train(cfg_b, [first, StopAt(3)])
    assert r1.steps == 3 and (tmp_path / "b" / "checkpoint.pt").exists()
    assert not list((tmp_path / "b").glob("*.tmp"))  # the atomic write left nothing behind
    second = LossRecorder()
    r2 = train(cfg_b, [second])
    assert r2.steps == 6 and len(second.losses) == 3
    got = torch.stack(first.losses + second.losses)
    want = torch.stack(whole.losses)
    assert torch.equal(got, want), (got, want)
    for pa, pb in zip(r2.model.parameters(), train(cfg).model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    train(tiny_cfg(steps=2, out_dir=str(tmp_path)))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "early_stopping"} <= set(ck)


def test_callbacks_see_state_in_order() -> None:
    rec = LossRecorder()
    res = train(tiny_cfg(steps=4, eval_every=2, grad_clip=1.0), [rec])
    assert rec.events[0] == "start" and rec.events[-1] == "end"
    assert [e.split()[0] for e in rec.events[1:-1]] == ["step", "step", "eval"] * 2
    assert all(g is not None and g.dim() == 0 for g in rec.grad_norms)
    assert res.steps == 4 and len(res.val_history) == 2
    no_clip = LossRecorder()
    train(tiny_cfg(steps=1, grad_clip=0.0), [no_clip])
    assert no_clip.grad_norms == [None]


def test_grad_norm_is_pre_clip() -> None:
    rec = LossRecorder()
    train(tiny_cfg(steps=2, grad_clip=1e-3), [rec])
    assert all(float(g) > 1e-3 for g in rec.grad_norms)  # what clip_grad_norm_ saw, not 1e-3


def test_batch_transform_is_applied() -> None:
    seen = []

    def transform(batch):
        seen.append(batch["input_ids"].shape)
        return batch

    train(tiny_cfg(steps=2, grad_accum=2, batch_size=4), batch_transform=transform)
    assert seen == [(4, 32)] * 4


def test_training_lowers_validation_loss() -> None:
    """Real learning on the built-in corpus in a fixed number of steps (~10 s on one core)."""
    cfg = dataclasses.replace(
        tiny_cfg(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, eval_batches=4),
        model=ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, pos_encoding="rope"),
    )
    torch.manual_seed(0)
    fresh = Transformer(cfg.model)
    _, val_b = build_batchers(cfg, 0, 1)
    from reference_model.data import eval_batches

    before = evaluate(fresh, eval_batches(val_b, cfg.eval_batches), cfg, torch.device("cpu"))
    result = train(cfg)
    assert abs(before - math.log(257)) < 0.2
    assert result.val_loss < before - 2.0, (before, result.val_loss)


def test_early_stopping_state_and_behaviour() -> None:
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert not es.update(3.0)
    assert not es.update(2.995)  # within min_delta: not an improvement
    copy = EarlyStopping(patience=2, min_delta=0.01)
    copy.load_state_dict(es.state_dict())
    assert copy.state_dict() == {"best": 3.0, "bad_evals": 1}
    assert copy.update(3.1)  # second bad evaluation: stop
    assert not EarlyStopping(patience=2).update(1.0)


def test_early_stopping_ends_training() -> None:
    # lr so high that validation loss gets worse: training stops after `patience` evals
    cfg = tiny_cfg(
        steps=60, eval_every=2, early_stopping_patience=2, lr=0.5, warmup_steps=0, grad_clip=0.0
    )
    res = train(cfg)
    assert res.stopped_early and res.steps < 60


def test_weight_decay_groups() -> None:
    m = Transformer(ModelConfig(d_model=32, n_heads=4, n_layers=1, pos_encoding="learned"))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
    }
    assert {
        "embed.weight",
        "pos.weight",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
    } <= no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_schedules() -> None:
    cos = lr_lambda(tiny_cfg(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(99) == pytest.approx(0.1) and 0.1 < cos(50) < 1.0
    noam = lr_lambda(tiny_cfg(schedule="noam", warmup_steps=16))
    assert noam(15) == pytest.approx(1.0)
    assert noam(63) == pytest.approx(0.5)  # inverse square root: 4x the steps, half the rate
    assert noam(3) == pytest.approx(0.25)  # linear warmup


def test_bf16_and_encoder_and_documents_run() -> None:
    for cfg in (
        tiny_cfg(steps=2, precision="bf16"),
        tiny_cfg(steps=2, model=dict(causal=False)),
        tiny_cfg(steps=2, batching="documents", model=dict(activation_checkpointing=True)),
    ):
        res = train(cfg)
        assert math.isfinite(res.final_loss) and math.isfinite(res.val_loss)
    with pytest.raises(ValueError, match="fp16"):
        train(tiny_cfg(precision="fp16"))
    with pytest.raises(ValueError, match="'adam'"):
        tiny_cfg(schedule="adam")


def test_cli_main_runs(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "--steps",
            "3",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--n-layers",
            "1",
            "--max-seq-len",
            "32",
            "--batch-size",
            "4",
            "--data-max-bytes",
            "200000",
            "--no-monitor",
            "--quiet",
            "--sample",
            "20",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "checkpoint.pt").exists()
    assert capsys.readouterr().out.startswith("def ")
    assert main(["--lr", "-1", "--quiet"]) == 2


_GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _run_torchrun(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run torchrun; once more if a rank aborted in gloo's C++ teardown after the work was
    done (a rare race inside torch at process exit on a loaded 2-core machine, seen even
    with a barrier before destroy_process_group). Any other failure is returned as is."""
    proc = subprocess.run(cmd, **kwargs)
    if proc.returncode != 0 and _GLOO_TEARDOWN_ABORT in proc.stderr:
        proc = subprocess.run(cmd, **kwargs)
    return proc


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    """torchrun, 2 ranks x 4 sequences (gloo) == 1 process x 8 sequences: same all-reduced
    gradients, hence the same parameters after the optimizer steps."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [
        "--steps",
        "2",
        "--d-model",
        "32",
        "--n-heads",
        "4",
        "--n-layers",
        "2",
        "--max-seq-len",
        "32",
        "--warmup-steps",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
        "--data-max-bytes",
        "300000",
        "--device",
        "cpu",
        "--quiet",
        "--no-monitor",
        "--sample",
        "0",
    ]
    env = CHILD_ENV
    proc = _run_torchrun(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "reference_model.train",
            *args,
            "--batch-size",
            "4",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    single = train(tiny_cfg(steps=2, batch_size=8, grad_clip=1.0))
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, atol=1e-5, rtol=1e-4, msg=name)
    # ... and it is not trivially equal to the untrained model
    torch.manual_seed(0)
    init = Transformer(single.model.config).state_dict()
    assert not torch.allclose(
        ddp_state["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_and_resume(tmp_path: Path, precision: str) -> None:
    cfg = tiny_cfg(steps=4, device="cuda", precision=precision, out_dir=str(tmp_path))
    whole = LossRecorder()
    res = train(cfg, [whole])
    assert math.isfinite(res.final_loss) and math.isfinite(res.val_loss)
    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True)
    first, second = LossRecorder(), LossRecorder()
    train(cfg_b, [first, StopAt(2)])
    train(cfg_b, [second])
    got = torch.stack(first.losses + second.losses).cpu()
    # CUDA embedding backward uses atomics: equal up to float reordering, not bitwise
    torch.testing.assert_close(got, torch.stack(whole.losses).cpu(), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kv_cache_and_mask_paths_match_cpu() -> None:
    torch.manual_seed(0)
    cpu = Transformer(
        ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, pos_encoding="rope")
    ).eval()
    gpu = Transformer(cpu.config).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, 256, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    from reference_model.model import decode_with_cache

    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).logits.cpu(), cpu(x).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            gpu(x.cuda(), attention_mask=mask.cuda()).logits.cpu()[mask.bool()],
            cpu(x, attention_mask=mask).logits[mask.bool()],
            atol=1e-4,
            rtol=1e-4,
        )
        torch.testing.assert_close(
            decode_with_cache(gpu, x.cuda()).cpu(), cpu(x).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.slow
def test_demo_command_writes_the_run_folder(tmp_path: Path, monkeypatch) -> None:
    from reference_model.train import demo_command

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "demo"
    assert demo_command(out=out, steps=3, device="cpu", quiet=True) == 0
    assert (out / "checkpoint.pt").exists()
    assert (out / "history.jsonl").exists()  # written by tdiag's Monitor
    assert demo_command(out=out, steps=0, device="cpu", quiet=True) == 2
    first = (out / "history.jsonl").read_bytes()
    assert demo_command(out=out, steps=2, device="cpu", quiet=True) == 0
    # a second demo starts fresh; the first run is kept beside it, not appended to
    assert (tmp_path / "demo.previous" / "history.jsonl").read_bytes() == first
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 2


def test_demo_leaves_a_folder_that_is_not_a_run_alone(tmp_path: Path) -> None:
    from reference_model.cli import _set_aside_previous_run

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    assert _set_aside_previous_run(keep) is None and (keep / "notes.txt").exists()
    run = tmp_path / "demo"
    run.mkdir()
    (run / "meta.json").write_text("{}")
    (tmp_path / "demo.previous").mkdir()
    (tmp_path / "demo.previous" / "notes.txt").write_text("x")  # not a run: never deleted
    with pytest.raises(OSError, match="not a tdiag run folder"):
        _set_aside_previous_run(run)
    assert (tmp_path / "demo.previous" / "notes.txt").exists() and (run / "meta.json").exists()


def test_reference_model_does_not_import_tdiag() -> None:
    code = (
        "import sys, reference_model.model, reference_model.train, reference_model.data; "
        "assert not any(m == 'tdiag' or m.startswith('tdiag.') for m in sys.modules), 'tdiag imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=CHILD_ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_ddp_stop_on_one_rank_stops_all_and_resume_is_exact(tmp_path: Path) -> None:
    """A stop asked on rank 0 only is agreed at the next log step: no rank hangs. Then stop +
    resume under DDP equals an uninterrupted run on every rank (per-rank RNG states)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("ddp_stop_worker.py")
    proc = _run_torchrun(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        cwd=REPO,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 stopped at 4" in proc.stdout and "rank 1 stopped at 4" in proc.stdout
    assert "rank 0 resume equal True" in proc.stdout
    assert "rank 1 resume equal True" in proc.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


class Crash(Exception):
    pass


class CrashAt:
    """Dies like a killed process: no checkpoint at the crash, only the periodic ones."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            raise Crash


@pytest.mark.parametrize("causal", [False, True])
def test_crash_then_resume_from_periodic_checkpoint_equals_uninterrupted(
    tmp_path: Path, causal: bool
) -> None:
    """--checkpoint-every 2, a crash at step 3, --resume: steps 3.. are redone and every loss
    (train and validation) equals the uninterrupted run's; the encoder's random corruption too."""
    cfg = tiny_cfg(
        steps=5,
        batching="documents",
        eval_every=2,
        checkpoint_every=2,
        model=dict(dropout=0.1, causal=causal),
        out_dir=str(tmp_path / "a"),
    )
    whole = LossRecorder()
    want = train(cfg, [whole])
    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True)
    first = LossRecorder()
    with pytest.raises(Crash):
        train(cfg_b, [first, CrashAt(3)])
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    second = LossRecorder()
    got = train(cfg_b, [second])
    assert torch.equal(torch.stack(first.losses[:2] + second.losses), torch.stack(whole.losses))
    assert got.val_history == want.val_history and len(want.val_history) == 3


class PaddingRecorder:
    def __init__(self) -> None:
        self.fractions: list[float] = []

    def on_step_end(self, state) -> None:
        self.fractions.append(state.padding_frac)


def test_padding_fraction_is_reported(capsys) -> None:
    from reference_model.train import ProgressLine

    seen: dict[bool, list[float]] = {}
    for bucket in (False, True):
        cfg = tiny_cfg(steps=4, batching="documents", bucket=bucket, log_every=2, quiet=False)
        rec = PaddingRecorder()
        train(cfg, [rec, ProgressLine(log_every=2, total=4)])
        seen[bucket] = rec.fractions
    assert all(0.0 <= f < 1.0 for f in seen[False]) and sum(seen[False]) > 0
    assert sum(seen[True]) < sum(seen[False])  # bucketing cuts padding
    assert " pad " in capsys.readouterr().err
    chunks = PaddingRecorder()
    train(tiny_cfg(steps=1), [chunks])
    assert chunks.fractions == [0.0]


def test_monitor_callback_logs_padding_fraction() -> None:
    from reference_model.train import MonitorCallback

    class FakeMonitor:  # the Monitor's public calls, recorded
        stop_requested = False

        def __init__(self) -> None:
            self.logged: list[tuple[int, dict]] = []

        def step(self, loss, **kw) -> None:
            pass

        def log(self, metrics, step=None) -> None:
            self.logged.append((step, dict(metrics)))

        def close(self) -> None:
            pass

    mon = FakeMonitor()
    cfg = tiny_cfg(steps=4, batching="documents", bucket=False, log_every=2)
    train(cfg, [MonitorCallback(lambda s: mon)])
    pads = [(s, m["data/padding_frac"]) for s, m in mon.logged if "data/padding_frac" in m]
    assert [s for s, _ in pads] == [1, 2, 4]
    assert all(0.0 <= f < 1.0 for _, f in pads) and sum(f for _, f in pads) > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "lr must be > 0"),
        (["--n-heads", "3", "--d-model", "32"], "divisible"),
        (["--data", "/nonexistent/corpus"], "does not exist"),
        (["--data", "TINY"], "too small"),
        (["--data", "EMPTY_DIR"], "no text"),
        (["--early-stopping-patience", "-1"], "early_stopping_patience must be >= 0, got -1"),
        (["--beta2", "1.5"], "beta2 must be in [0, 1], got 1.5"),
        (["--mlm-prob", "0"], "mlm_prob"),
        (["--resume"], "need out_dir"),
    ],
)
def test_cli_bad_input_is_a_clear_error_with_exit_2(tmp_path: Path, capsys, argv, message) -> None:
    (tmp_path / "tiny.txt").write_text("hi there\n")
    (tmp_path / "empty").mkdir()
    subst = {"TINY": str(tmp_path / "tiny.txt"), "EMPTY_DIR": str(tmp_path / "empty")}
    argv = [subst.get(a, a) for a in argv]
    assert main([*argv, "--quiet", "--no-monitor", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_resume_keeps_an_early_stop_and_refuses_another_model(tmp_path: Path, capsys) -> None:
    cfg = tiny_cfg(
        steps=30,
        eval_every=1,
        lr=0.5,
        schedule="constant",
        warmup_steps=0,
        early_stopping_patience=2,
        out_dir=str(tmp_path),
        resume=True,
    )
    first = train(cfg)
    assert first.stopped_early and first.steps < 30
    again = LossRecorder()
    second = train(cfg, [again])  # the stop is part of the run's state: nothing more to do
    assert second.stopped_early and second.steps == first.steps and again.losses == []
    other = dataclasses.replace(cfg, model=ModelConfig(d_model=64, n_heads=4, max_seq_len=32))
    with pytest.raises(ValueError, match="d_model: 32 -> 64"):
        train(other)
    argv = ["--out-dir", str(tmp_path), "--resume", "--d-model", "64", "--max-seq-len", "32"]
    assert main([*argv, "--quiet", "--no-monitor", "--device", "cpu"]) == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.parametrize("batching", ["chunks", "documents"])
def test_small_validation_split_gets_smaller_batches(tmp_path: Path, batching: str) -> None:
    """A single file's last 10 % holds fewer sequences than a batch: evaluate on what is
    there instead of failing (the training split still needs full batches)."""
    text = "\n\n".join(f"paragraph {i}: " + "some words here " * 3 for i in range(60))
    (tmp_path / "corpus.txt").write_text(text)
    cfg = tiny_cfg(data=str(tmp_path / "corpus.txt"), batching=batching, batch_size=16)
    train_b, val_b = build_batchers(cfg, 0, 1)
    assert train_b.batch(0)["input_ids"].shape[0] == 16
    assert 0 < val_b.batch(0)["input_ids"].shape[0] < 16
    assert math.isfinite(train(dataclasses.replace(cfg, steps=1)).val_loss)


def test_the_names_of_train_py_before_the_split_still_import() -> None:
    """train.py was split into the loop, checkpointing, the CLI …: what users and tdiag
    imported from reference_model.train still resolves there, to the same objects."""
    import reference_model.train as t
    from reference_model import callbacks, checkpointing, cli, config, optim, step

    same = {
        "TrainConfig": config.TrainConfig,
        "EarlyStopping": optim.EarlyStopping,
        "lr_lambda": optim.lr_lambda,
        "param_groups": optim.param_groups,
        "forward_backward": step.forward_backward,
        "autocast_context": step.autocast_context,
        "evaluate": step.evaluate,
        "save_checkpoint": checkpointing.save_checkpoint,
        "ResumeError": checkpointing.ResumeError,
        "CHECKPOINT_FILE": checkpointing.CHECKPOINT_FILE,
        "MonitorCallback": callbacks.MonitorCallback,
        "ProgressLine": callbacks.ProgressLine,
        "attach_monitor": callbacks.attach_monitor,
        "main": cli.main,
        "demo_command": cli.demo_command,
        "demo_config": cli.demo_config,
        "build_parser": cli.build_parser,
        "config_from_args": cli.config_from_args,
        "sample_text": cli.sample_text,
        "DEMO_STEPS": cli.DEMO_STEPS,
    }
    for name, obj in same.items():
        assert getattr(t, name) is obj, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        t.nope  # noqa: B018
