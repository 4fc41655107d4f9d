"""``tdiag check``: run the checks on a model file in a child process and print the report
or the JSON.

Torch-free, so that the child is forked before torch is imported (see
:mod:`tdiag.debug.worker`): torch is imported once, by the child, that does the work.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

from tdiag.debug.results import error_json
from tdiag.debug.usercode import LoadError, parse_target
from tdiag.terminal import output_console

__all__ = ["check_command"]


def check_command(
    target: str,
    *,
    json_out: bool = False,
    device: str = "cpu",
    batch_size: int | None = None,
    seq_len: int | None = None,
    only: str | None = None,
    skip: str | None = None,
    seed: int = 0,
    no_causal: bool = False,
    timeout: float | None = 180.0,
) -> int:
    """``tdiag check``: load the file, run the checks, print the report or the JSON.

    The file is imported and checked in a child process (:func:`tdiag.debug.worker.run_job`):
    ``timeout`` is enforced from outside it, and a file that ends the process is reported.

    Returns:
        0 when no error-level finding, 1 when at least one, 2 when the file could not be
        loaded or run, or the options are invalid (message on stderr; with ``json_out``,
        stdout holds one JSON object with an ``"error"`` key too).
    """
    from tdiag.debug import render
    from tdiag.debug.worker import CheckJob, run_job

    err = output_console(stderr=True, highlight=False)
    try:
        for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        job = CheckJob(
            target=target,
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
        status = None
        if not json_out and err.is_terminal:
            status = err.status(f"loading {parse_target(target)[0].name}")
            status.start()
        try:
            run = run_job(job, on_progress=status.update if status is not None else None)
        finally:
            if status is not None:
                status.stop()
    except ValueError as exc:  # an invalid option
        err.print(f"[bold red]tdiag check:[/] {exc}", markup=True, soft_wrap=True)
        _print_json_error(json_out, target, LoadError(str(exc), cause="bad-option"))
        return 2
    except LoadError as exc:
        _print_error(err, exc)
        _print_json_error(json_out, target, exc)
        return 2
    notes = _ignored_options(run.meta, batch_size=batch_size, seq_len=seq_len)
    if json_out:
        _print_json(run.to_json(target) | ({"notes": notes} if notes else {}))
    else:
        render.render_report(run, target=target, console=output_console(highlight=False))
    for note in notes:
        err.print(f"[yellow]tdiag check: note:[/] {note}", markup=True, soft_wrap=True)
    if run.error is not None:
        # the file could not be fully run: Contract 1's exit code 2, with the finished checks'
        # results printed above (stdout) and the cause on stderr
        _print_error(err, run.error)
        return 2
    return 1 if run.summary["errors"] else 0


def _ignored_options(
    meta: dict[str, object], *, batch_size: int | None, seq_len: int | None
) -> list[str]:
    """Options the run did not use, said rather than silently dropped: ``--seq-len`` and
    ``--batch-size`` shape the random batch only, and a file with ``get_batch()`` (or
    ``make_batch()`` / ``example_batch()``) gives its own."""
    given = [
        name
        for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len))
        if value is not None
    ]
    if not given or meta.get("batch_source") != "file":
        return []
    return [
        f"{' and '.join(given)} not used: the file defines its own batch (get_batch(), "
        f"make_batch() or example_batch()), of shape {tuple(meta.get('batch_shape') or ())}; "
        "change the batch there, or remove the function to use a random batch."
    ]


def _print_error(err: Console, exc: LoadError) -> None:
    err.print("[bold red]tdiag check: error:[/] ", end="", markup=True)
    err.print(str(exc), markup=False, highlight=False, soft_wrap=True)


def _print_json_error(json_out: bool, target: str, exc: LoadError) -> None:
    if json_out:
        _print_json(error_json(target, exc))


def _print_json(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()
