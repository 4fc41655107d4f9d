"""The adapters' last line: where report.html went (they run the Monitor without its console)."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from tdiag import Monitor
from tdiag.integrations._report_line import print_report_line, report_line


def _run(tmp_path, **options) -> Monitor:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(
        model, optimizer=opt, run_dir=tmp_path / "run", log_every=2, tensorboard=False,
        system=False, **options,
    )  # fmt: skip
    with mon:
        for _ in range(4):
            loss = model(torch.randn(2, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss)
    return mon


def test_line_names_the_report_when_it_was_written(tmp_path) -> None:
    mon = _run(tmp_path, console=False, report=True)
    assert report_line(mon) == (
        f"tdiag: report at {tmp_path / 'run' / 'report.html'} (run folder {tmp_path / 'run'})"
    )
    buf = io.StringIO()
    print_report_line(mon, Console(file=buf, width=40))
    assert buf.getvalue().count("\n") == 1  # one line, never wrapped (a path is long)


def test_line_says_how_to_build_a_report_that_was_not_written(tmp_path) -> None:
    mon = _run(tmp_path, console=False, report=False)
    line = report_line(mon)
    assert line is not None and "no report.html" in line
    assert f"`tdiag report {tmp_path / 'run'}` builds it" in line


def test_no_line_when_the_monitors_console_already_said_it(tmp_path) -> None:
    mon = _run(tmp_path, console=True, quiet=False, report=False)
    assert report_line(mon) is None
