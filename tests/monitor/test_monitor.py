"""The Monitor end to end: run folder, real sinks, live alerts, callbacks, failures."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import tdiag.report
from tdiag import Monitor
from tdiag.history import read_events, read_history
from tdiag.monitor import MonitorConfig, NonFiniteError

from .conftest import ListSink, make_batch, quiet_options, train_loop


def strict_lines(path):
    def reject(token):
        raise ValueError(f"bare {token} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_run_folder_with_the_real_sinks(tmp_path, tiny_gpt):
    opts = quiet_options(
        tmp_path, log_every=5, tensorboard=True, system=True, system_interval_s=0.05
    )
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3)
    with Monitor(tiny_gpt, opt, config={"lr": 1e-3, "grad_clip": 1.0}, **opts) as mon:
        train_loop(tiny_gpt, mon, 12, opt=opt, clip=1.0)
        mon.log({"val/loss": torch.tensor(3.5)})
    run = tmp_path / "run"
    rows = strict_lines(run / "history.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == [1, 5, 10, 12, 12]  # the val row, then the final flush
    assert rows[3] == {"step": 12, "time": rows[3]["time"], "val/loss": 3.5}
    df, stats = read_history(run)
    assert not stats.problems
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/grad_clip_frac",
        "train/update_ratio",
        "perf/step_time",
        "perf/tokens_per_sec",
        "perf/mfu",
        "sys/rss_gb",
    ):
        assert key in df.columns, key
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"] == {"lr": 1e-3, "grad_clip": 1.0}
    n = sum(p.numel() for p in tiny_gpt.parameters())
    assert meta["model"]["params_total"] == n == meta["model"]["params_trainable"]
    env = meta["environment"]
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and env["hostname"]
    assert meta["end"]["status"] == "completed" and meta["end"]["steps"] == 12
    assert meta["monitor"]["clip_used"] == 1.0
    assert meta["perf"]["flops_per_token"] > 0
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == [1, 5, 10, 12]
    assert tb_loss[1][1] == pytest.approx(df.loc[df["step"] == 5, "train/loss"].item())
    assert not (run / "flight_recorder.jsonl").exists()
    assert not any(h for m in tiny_gpt.modules() for h in m._forward_pre_hooks.values())


def plant_nan(at_step, module="blocks.1.fc1"):
    def on_step(step, model):
        if step == at_step:
            with torch.no_grad():
                model.get_submodule(module).weight.fill_(float("nan"))

    return on_step


@pytest.mark.parametrize(
    ("watch", "plant", "where"),
    [(None, 6, None), ("layers", 6, None), ("layers", 9, "blocks.1.fc1")],
)
def test_nonfinite_loss_alert(tmp_path, tiny_gpt, watch, plant, where):
    sink = ListSink()
    opts = quiet_options(tmp_path, log_every=5, watch=watch)
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-2)
    with Monitor(tiny_gpt, opt, sinks=[sink], **opts) as mon:
        train_loop(tiny_gpt, mon, 12, opt=opt, on_step=plant_nan(plant))
    ids = [f.id for f in sink.events]
    assert ids == ["train.nonfinite-loss", "train.nonfinite-grad"]  # each raised once
    loss_f = sink.events[0]
    assert loss_f.step == plant + 1 and loss_f.severity.value == "error"
    assert loss_f.evidence["interval"] == [6, 10]
    # The first module whose output went NaN, when the log step's forward is the first bad
    # one; after a NaN update every module is NaN and no place is named.
    assert loss_f.where == where
    events = read_events(tmp_path / "run")
    assert [e["id"] for e in events] == ids
    recorder = strict_lines(tmp_path / "run" / "flight_recorder.jsonl")
    assert recorder[0]["flight_recorder"]["reason"] == "train.nonfinite-loss"
    assert [r["step"] for r in recorder[1:]] == list(range(1, 11))
    assert recorder[plant + 1]["train/loss"] == "NaN"
    assert isinstance(recorder[plant]["train/loss"], float)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["end"]["status"] == "nonfinite"


def test_no_alert_on_a_healthy_run(tmp_path, tiny_gpt):
    sink = ListSink()
    with Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path, log_every=5)) as mon:
        train_loop(tiny_gpt, mon, 10)
    assert sink.events == [] and mon.findings == []


def test_strict_raises_at_the_step(tmp_path, tiny_gpt):
    sink = ListSink()
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-2)
    with pytest.raises(NonFiniteError, match="step 4"):  # noqa: SIM117
        with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, strict=True)) as mon:
            train_loop(tiny_gpt, mon, 8, opt=opt, on_step=plant_nan(3))
    assert sink.events[0].id == "train.nonfinite-loss" and sink.events[0].step == 4
    assert sink.closed


def test_exception_leaving_the_block_dumps_the_flight_recorder(tmp_path, tiny_gpt):
    def boom(step, model):
        if step == 7:
            raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):  # noqa: SIM117
        with Monitor(tiny_gpt, **quiet_options(tmp_path, log_every=5, flight_recorder=4)) as mon:
            train_loop(tiny_gpt, mon, 10, on_step=boom)
    lines = strict_lines(tmp_path / "run" / "flight_recorder.jsonl")
    head = lines[0]["flight_recorder"]
    assert head["reason"] == "exception" and "data loader died" in head["detail"]
    assert [r["step"] for r in lines[1:]] == [4, 5, 6, 7]  # the ring keeps the last 4
    assert "train/loss" in lines[-1]  # the pending interval was flushed first
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["end"]["status"] == "exception"


class BrokenSink(ListSink):
    def write(self, step, metrics):
        raise OSError("disk full")


def test_a_failing_sink_never_stops_training(tmp_path, tiny_gpt, caplog):
    good = ListSink()
    with (
        caplog.at_level(logging.WARNING),
        Monitor(
            tiny_gpt, sinks=[BrokenSink(), good], **quiet_options(tmp_path, log_every=2)
        ) as mon,
    ):
        train_loop(tiny_gpt, mon, 6)
    assert [s for s, _ in good.rows] == [1, 2, 4, 6]
    assert sum("disk full" in r.message for r in caplog.records) == 1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["end"]["sink_failures"][0]["sink"] == "BrokenSink"


def test_report_is_built_on_close_and_its_failure_is_not_raised(
    tmp_path, tiny_gpt, monkeypatch, caplog
):
    calls = []
    monkeypatch.setattr(
        tdiag.report, "build_report", lambda run_dir, console=None: calls.append(run_dir)
    )
    with Monitor(tiny_gpt, **quiet_options(tmp_path, report=True)) as mon:
        train_loop(tiny_gpt, mon, 2)
    assert calls == [tmp_path / "run"]

    def broken(run_dir, console=None):
        raise KeyError("no such column")

    monkeypatch.setattr(tdiag.report, "build_report", broken)
    with caplog.at_level(logging.WARNING):
        mon = Monitor(tiny_gpt, **quiet_options(tmp_path / "b", report=True))
        train_loop(tiny_gpt, mon, 2)
        mon.close()
    assert any("building the report failed" in r.message for r in caplog.records)


def test_real_report_is_written(tmp_path, tiny_gpt):
    with Monitor(tiny_gpt, **quiet_options(tmp_path, report=True, log_every=2)) as mon:
        train_loop(tiny_gpt, mon, 6)
    assert (tmp_path / "run" / "report.json").exists()


def test_report_summary_goes_to_the_live_console_unless_quiet(tmp_path, tiny_gpt):
    import io

    from rich.console import Console

    from tdiag.monitor.sinks import ConsoleSink

    for quiet in (False, True):
        buf = io.StringIO()
        console = Console(file=buf, width=100, force_terminal=False, color_system=None)
        opts = quiet_options(tmp_path / str(quiet), report=True, log_every=2)
        sink = ConsoleSink(total_steps=6, quiet=quiet, console=console)
        with Monitor(tiny_gpt, sinks=[sink], **opts) as mon:
            train_loop(tiny_gpt, mon, 6)
        text = buf.getvalue()
        assert ("report.html" in text) is (not quiet), text


def test_callback_aliases(tmp_path, tiny_gpt):
    class State:
        pass

    sink = ListSink()
    mon = Monitor(tiny_gpt, sinks=[sink], **quiet_options(tmp_path, log_every=2))
    mon.on_train_start(None)
    state = State()
    for step in (1, 2):
        ids = make_batch(step)
        state.step, state.loss, state.tokens, state.grad_norm, state.data_time = (
            step,
            torch.tensor(2.0 + step),
            ids.numel(),
            None,
            0.01,
        )
        state.should_stop = False
        mon.on_step_end(state)
    state.val_loss = 1.5
    mon.on_eval(state)
    mon.on_train_end(state)
    rows = sink.merged()
    assert rows[1]["train/loss"] == 3.0 and rows[2]["train/loss"] == 4.0
    assert rows[2]["val/loss"] == 1.5 and rows[2]["perf/data_time"] == 0.01
    assert sink.closed and not state.should_stop


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"log_every": 0}, "log_every"),
        ({"watch": "all"}, "watch"),
        ({"clip": -1.0}, "clip"),
        ({"console": "yes"}, "console"),
        ({"flight_recorder": -1}, "flight_recorder"),
    ],
)
def test_invalid_options_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**kw)


def test_unknown_option_is_a_type_error(tiny_gpt, tmp_path):
    with pytest.raises(TypeError):
        Monitor(tiny_gpt, run_dir=tmp_path, log_evry=5)


def test_watch_layers_leaves_no_hook_between_log_steps(tmp_path, tiny_gpt):
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_gpt.modules())

    before = hooks()
    counts = {}
    with Monitor(tiny_gpt, **quiet_options(tmp_path, log_every=5, watch="layers")) as mon:
        train_loop(tiny_gpt, mon, 7, on_step=lambda s, m: counts.__setitem__(s, hooks()))
    # after step 2 the next step (3) is not a log step: only the data-time pre-hook remains
    assert counts[2] == before + 1
    assert counts[4] > counts[2]  # armed for log step 5
    assert hooks() == before


def test_first_nonfinite_param(tiny_gpt):
    from tdiag.monitor.alerts import first_nonfinite_param

    assert first_nonfinite_param(tiny_gpt) is None
    with torch.no_grad():
        tiny_gpt.blocks[1].proj.bias[0] = float("inf")
    assert first_nonfinite_param(tiny_gpt) == "blocks.1.proj.bias"
    for p in tiny_gpt.parameters():
        p.grad = torch.zeros_like(p)
    tiny_gpt.blocks[0].fc2.weight.grad[0, 0] = float("nan")
    assert first_nonfinite_param(tiny_gpt) == "blocks.0.fc2.weight"  # gradients first


def test_a_failing_log_step_does_not_stop_training(tmp_path, tiny_gpt, monkeypatch, caplog):
    from tdiag.monitor import logstep as monitor_module  # where the log step lives

    real = monitor_module.summarize_interval
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("a bug in a metric")
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "summarize_interval", flaky)
    sink = ListSink()
    with (
        caplog.at_level(logging.WARNING),
        Monitor(
            tiny_gpt, sinks=[sink], **quiet_options(tmp_path, log_every=2, watch="layers")
        ) as mon,
    ):
        train_loop(tiny_gpt, mon, 6)
        hooks = sum(len(m._forward_hooks) for m in tiny_gpt.modules())
    # the row of step 2 is lost, the next intervals are whole and no hook is left behind
    rows = dict(sink.rows)
    assert sorted(rows) == [1, 4, 6] and rows[4]["train/tokens"] == 4 * 64
    assert any("logging step 2 failed" in r.message for r in caplog.records)
    assert hooks == 0


def test_sys_exit_zero_is_not_a_crash(tmp_path, tiny_gpt):
    with pytest.raises(SystemExit), Monitor(tiny_gpt, **quiet_options(tmp_path)) as mon:
        train_loop(tiny_gpt, mon, 3)
        raise SystemExit(0)
    assert not (tmp_path / "run" / "flight_recorder.jsonl").exists()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["end"]["status"] == "completed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check really runs")
def test_cuda_check_script_exits_cleanly_without_cuda(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "bench" / "cuda_check.py"
    spec = importlib.util.spec_from_file_location("cuda_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_mfu_never_exceeds_one_when_the_measured_cpu_peak_came_out_low(
    tiny_gpt, tmp_path, monkeypatch
):
    """A CPU peak measured while other work held the cores is too low; the Monitor must
    then raise the peak (a maximum) rather than report MFU above 100%."""
    from tdiag.monitor import flops

    real = flops.measure_cpu_peak
    calls = []

    def busy_then_real(dtype_key="fp32", **kw):
        calls.append(dtype_key)
        if len(calls) == 1:  # the first measurement: 1000x too low
            return flops.PeakFlops(real(dtype_key, **kw).value / 1000, "measured: busy", "")
        return real(dtype_key, **kw)

    monkeypatch.setattr(flops, "measure_cpu_peak", busy_then_real)
    flops._MEASURED.clear()
    sink = ListSink()
    with Monitor(tiny_gpt, None, sinks=[sink], **quiet_options(tmp_path, log_every=2)) as mon:
        train_loop(tiny_gpt, mon, 6)
        info = mon.perf_info
    mfus = [v for _, v in sink.series("perf/mfu")]
    assert mfus and all(0 < v <= 1.0 for v in mfus)
    assert len(calls) >= 2 and "raised to" in info["peak_source"]
