"""The rich Console of the CLI's output: the terminal's width on a terminal, no wrapping
elsewhere.

rich wraps at 80 columns when it writes to a pipe or a file (it cannot know a width), which
splits headers and paths mid-line in a CI log. Off a terminal the CLI's consoles therefore
do not wrap at all (one finding line stays one line, whatever its length); ``COLUMNS`` set in
the environment still wins, as rich reads it.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

__all__ = ["UNWRAPPED_WIDTH", "output_console"]

#: Width given to a console that is not a terminal: wide enough that nothing tdiag prints
#: wraps (tables are only as wide as their content, never this wide).
UNWRAPPED_WIDTH = 10_000


def output_console(*, stderr: bool = False, **options: Any) -> Console:
    """A Console for the CLI's output (``stderr=True``: for its messages).

    On a terminal, rich's own width; elsewhere no soft wrapping and :data:`UNWRAPPED_WIDTH`
    columns, unless ``COLUMNS`` is set (read here, at the CLI's edge) or ``width`` is given.
    """
    console = Console(stderr=stderr, **options)
    if console.is_terminal or "width" in options or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH, **options)
