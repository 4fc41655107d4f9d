"""The `tdiag` command: `tdiag check | report | demo | explain`.

The commands are thin: each parses its options and hands over to the layer that does
the work (tdiag.debug, tdiag.report, reference_model.train). Heavy imports happen inside
the command so that `tdiag --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from tdiag import __version__


def _bare_flags(params: list[Any]) -> list[Any]:
    """Plain flags get an empty metavar, which typer prints instead of ``<bool>``. (typer
    vendors its own click: parameters are told apart by their attributes, not their class.)"""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose ``--help`` reads as a user expects: no type tag after a plain flag
    (typer writes ``--json <bool>``) and the argument's metavar bare in the usage line
    (typer writes ``{target}``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar
                if name is None:
                    name = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class _Group(TyperGroup):
    """The root ``tdiag --help``: no ``<bool>`` after its flags either."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class _Typer(typer.Typer):
    """Every command gets :class:`_Command`'s help, also those registered later."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(
    cls=_Group,
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
    target: str = typer.Argument(
        ...,
        metavar="PATH.py[:FACTORY]",
        help="The model file, optionally with the factory function to call.",
        show_default=False,
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of the rich report."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size of random batches."
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Sequence length of random batches (not used when the file defines get_batch()).",
    ),
    only: str | None = typer.Option(
        None,
        "--only",
        help="Checks to run, comma-separated: ids (grad.exploding), families (data, init, "
        "numerics, gradients, structure, attention, sanity) or globs (grad.*).",
    ),
    skip: str | None = typer.Option(
        None, "--skip", help="Checks to leave out, as for --only: ids, families or globs."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (repeatable results)."),
    no_causal: bool = typer.Option(False, "--no-causal", help="The model is bidirectional."),
    timeout: float = typer.Option(
        180.0, "--timeout", help="Stop after this many seconds (loading and checks; 0: none)."
    ),
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
    run_dirs: list[Path] = typer.Argument(
        ...,
        metavar="RUN_DIR...",
        help="A run folder (or a history.jsonl); several: a report each and a comparison "
        "(compare.html) that each report links to.",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write report.json/html (default: RUN_DIR)."
    ),
    fail_on: str | None = typer.Option(
        None, "--fail-on", help="error or warning: exit 1 when met."
    ),
    watch: bool = typer.Option(
        False, "--watch", help="Rebuild the page as the history grows (Ctrl-C ends)."
    ),
    interval: float = typer.Option(
        5.0, "--interval", help="With --watch: seconds between looks (and page refreshes)."
    ),
) -> None:
    """Turn a run's history into report.json and a self-contained report.html."""
    if watch:
        from tdiag.report.watch import watch_cli

        raise typer.Exit(watch_cli(run_dirs, out=out, interval=interval, json_out=json_out))
    if len(run_dirs) > 1:
        from tdiag.report.compare_page import reports_command

        raise typer.Exit(reports_command(run_dirs, json_out=json_out, out=out, fail_on=fail_on))
    from tdiag.report import report_command

    raise typer.Exit(report_command(run_dirs[0], json_out=json_out, out=out, fail_on=fail_on))


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(
        ...,
        metavar="RUN_A RUN_B [RUN_C ...]",
        help="Run folders (or history files).",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Where to write compare.json/html (default: <RUN_A's parent>/compare)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print compare.json to stdout."),
) -> None:
    """Compare runs: curves overlaid, config/environment diff, findings in one run and not the
    other, where the loss curves separate, throughput and memory (exit 0; 2 cannot read)."""
    from tdiag.report.compare_page import compare_command

    raise typer.Exit(compare_command(run_dirs, out=out, json_out=json_out))


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
    try:  # installed (wheel or editable): the reference model ships as tdiag.reference_model
        from tdiag.reference_model.cli import demo_command
    except ModuleNotFoundError as exc:
        if exc.name != "tdiag.reference_model":
            raise
        from reference_model.cli import demo_command  # a checkout on sys.path, not installed

    raise typer.Exit(demo_command(out=out, steps=steps, device=device, quiet=quiet))


@app.command()
def explain(
    finding_id: str | None = typer.Argument(
        None,
        metavar="ID",
        help="A Finding id (grad.exploding), or a Finding's docs field "
        "(docs/checks.md#grad-exploding).",
        show_default=False,
    ),
    list_ids: bool = typer.Option(False, "--list", help="Print every documented id."),
) -> None:
    """Print what a Finding id means, how it is detected and what to do (docs/checks.md)."""
    from tdiag.explain import explain_command

    raise typer.Exit(explain_command(finding_id, list_ids=list_ids))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
