"""The `tdiag` command: `tdiag check | report | demo`.

The commands are thin: each parses its options and hands over to the layer that does
the work (tdiag.debug, tdiag.report, reference_model.train). Heavy imports happen inside
the command so that `tdiag --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from tdiag import __version__

app = typer.Typer(
    name="tdiag",
    help="Diagnostics and monitoring for training Transformers in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tdiag: check a model before training, monitor it while it trains, report after."""


@app.command()
def check(
    target: str = typer.Argument(..., help="PATH.py[:FACTORY] — the user's model file."),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of the rich report."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size of random batches."
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Sequence length of random batches."
    ),
    only: str | None = typer.Option(None, "--only", help="Comma-separated check ids to run."),
    skip: str | None = typer.Option(None, "--skip", help="Comma-separated check ids to skip."),
    seed: int = typer.Option(0, "--seed", help="Random seed (repeatable results)."),
    no_causal: bool = typer.Option(False, "--no-causal", help="The model is bidirectional."),
    timeout: float = typer.Option(180.0, "--timeout", help="Stop after this many seconds."),
) -> None:
    """Find what is wrong with a model before training it (exit 0 ok, 1 errors, 2 cannot run)."""
    from tdiag.debug.command import check_command  # torch-free: see tdiag.debug.worker

    code = check_command(
        target,
        json_out=json_out,
        device=device,
        batch_size=batch_size,
        seq_len=seq_len,
        only=only,
        skip=skip,
        seed=seed,
        no_causal=no_causal,
        timeout=timeout,
    )
    raise typer.Exit(code)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (or a history.jsonl)."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write report.json/html (default: RUN_DIR)."
    ),
    fail_on: str | None = typer.Option(
        None, "--fail-on", help="error or warning: exit 1 when met."
    ),
) -> None:
    """Turn a run's history into report.json and a self-contained report.html."""
    from tdiag.report import report_command

    raise typer.Exit(report_command(run_dir, json_out=json_out, out=out, fail_on=fail_on))


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/demo"), "--out", help="Run folder to write."),
    steps: int | None = typer.Option(
        None, "--steps", help="Training steps (default: about two minutes on a CPU)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", help="No live console."),
) -> None:
    """Train the reference Transformer on the built-in corpus with the Monitor, then report."""
    from reference_model.train import demo_command

    raise typer.Exit(demo_command(out=out, steps=steps, device=device, quiet=quiet))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
