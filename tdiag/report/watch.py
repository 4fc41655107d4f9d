"""``tdiag report RUN_DIR --watch``: rebuild the page as the history grows.

For a run on a machine without TensorBoard: every ``interval`` seconds the history file is
checked; when it has grown, only the bytes appended since the last look are read, cut at
the last newline (the line the writer is writing stays for the next look), and handed to
the tolerant reader (:func:`tdiag.history.read_history`, which judges each line alone);
the new rows join those already read and the report is rebuilt from them, with a
``<meta http-equiv="refresh">`` so that an open page reloads itself (allowed by the
page's CSP: it is not a script). Ctrl-C ends the watch after the page in progress.

A run resumed from a checkpoint replays steps: rows already read whose step a new chunk
starts at or before are dropped (the reader's rule for a resumed run, across chunks). A
history that shrinks (replaced, rotated) is read again from the start.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tdiag.history import ReadStats

__all__ = ["IncrementalHistory", "add_refresh", "watch_cli", "watch_command", "watch_report"]

DEFAULT_INTERVAL_S = 5.0
_COUNTERS = ("lines", "blank", "garbage", "no_step", "non_monotonic", "superseded",
             "nonfinite_values", "invalid_utf8", "non_numeric", "bad_keys", "bad_schema")  # fmt: skip


def add_refresh(html: str, seconds: float) -> str:
    """``html`` with ``<meta http-equiv="refresh" content="N">`` at the top of its head."""
    tag = f'<meta http-equiv="refresh" content="{max(1, math.ceil(seconds))}">'
    head = html.find("<head>")
    if head < 0:
        return tag + html
    cut = head + len("<head>")
    return html[:cut] + "\n" + tag + html[cut:]


@dataclass
class IncrementalHistory:
    """A history file read a chunk at a time: the byte offset of what was read, the rows.

    Attributes:
        path: the history.jsonl.
        offset: bytes read so far (always just after a newline).
        resets: times the file shrank and was read again from the start.
    """

    path: Path
    offset: int = 0
    resets: int = 0
    _frames: list[Any] = field(default_factory=list, repr=False)
    _stats: list[Any] = field(default_factory=list, repr=False)
    _bad_chunks: int = 0
    _resumed: int = 0
    _superseded: int = 0

    def poll(self) -> int:
        """Read what was appended since the last call; returns the number of new rows.

        Raises:
            HistorySchemaError: the new lines declare a newer history format.
            OSError: the file cannot be read (missing: 0 rows, nothing raised).
        """
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        if size < self.offset:  # replaced or truncated: start again
            self.offset, self.resets = 0, self.resets + 1
            self._frames, self._stats = [], []
        if size == self.offset:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # only the line in flight: wait for its newline
            return 0
        self.offset += cut
        return self._add(data[:cut])

    def _add(self, chunk: bytes) -> int:
        from tdiag.history import HistoryReadError, HistorySchemaError, read_history

        fd, name = tempfile.mkstemp(prefix="tdiag-watch-", suffix=".jsonl")
        part = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(chunk)
            df, stats = read_history(part)
        except HistorySchemaError as exc:
            raise HistorySchemaError(self.path, exc.found) from None
        except HistoryReadError:  # no row in these lines (garbage, blank lines)
            self._bad_chunks += chunk.count(b"\n")
            return 0
        finally:
            part.unlink(missing_ok=True)
        first = int(df["step"].iloc[0])
        previous = self._previous_step()
        if previous is not None and first < previous:
            # the step went backwards: a resumed run replays steps and its rows win, as in
            # one read of the whole file (rows of the same step, e.g. val/loss, all stay)
            before = self.rows
            self._frames = [f[f["step"] < first] for f in self._frames]
            self._resumed += 1
            self._superseded += before - self.rows
        self._frames.append(df)
        self._stats.append(stats)
        return len(df)

    def _previous_step(self) -> int | None:
        """The step of the last row read (None before the first)."""
        for f in reversed(self._frames):
            if len(f):
                return int(f["step"].iloc[-1])
        return None

    @property
    def rows(self) -> int:
        return sum(len(f) for f in self._frames)

    def frame(self) -> tuple[pd.DataFrame, ReadStats]:
        """All rows read so far as one frame (columns in order of first appearance) and
        the readers' counters summed.

        Raises:
            HistoryReadError: no row yet.
        """
        import pandas as pd

        from tdiag.history import DROPPED_ATTR, HistoryReadError, ReadStats

        frames = [f for f in self._frames if len(f)]
        if not frames:
            raise HistoryReadError(f"{self.path} holds no readable row yet")
        df = pd.concat(frames, ignore_index=True, sort=False)
        dropped: dict[str, list[int]] = {}
        base = 0
        for f in frames:  # each chunk's dropped-cell labels, shifted to the joined frame
            for col, labels in (f.attrs.get(DROPPED_ATTR) or {}).items():
                pos = f.index.get_indexer(list(labels))
                dropped.setdefault(col, []).extend(int(p) + base for p in pos if p >= 0)
            base += len(f)
        df.attrs = {DROPPED_ATTR: {k: tuple(v) for k, v in dropped.items()}} if dropped else {}
        st = ReadStats()
        names = {f.name for f in fields(ReadStats)}
        for s in self._stats:
            for c in _COUNTERS:
                if c in names:
                    setattr(st, c, getattr(st, c) + getattr(s, c))
            st.schema = max(st.schema or 0, s.schema or 0) or None
            st.non_numeric_keys = {
                k: st.non_numeric_keys.get(k, 0) + s.non_numeric_keys.get(k, 0)
                for k in {*st.non_numeric_keys, *s.non_numeric_keys}
            }
        st.non_monotonic += self._resumed
        st.superseded += self._superseded
        st.garbage += self._bad_chunks
        st.lines += self._bad_chunks
        st.rows = len(df)
        st.bytes_read = self.offset
        return df, st


def watch_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    max_builds: int | None = None,
    on_build: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Rebuild the report of ``run_dir`` whenever its history grows; returns the builds.

    Args:
        run_dir: the run folder (or its history.jsonl).
        out: where report.json/html go (default: the run folder).
        interval: seconds between looks at the file (> 0); also the page's refresh period.
        max_builds: stop after this many builds (None: until ``should_stop`` or Ctrl-C).
        on_build: called with each report.json object.
        should_stop: checked after each look; True ends the watch.
        sleep: waits between looks (a test passes a fake).

    Raises:
        ValueError: ``interval`` is not a positive number.
        HistoryReadError: the run folder is not one (no history file and none to come).
    """
    from tdiag.report import _locate, build_report

    if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
    history_path, _ = _locate(Path(run_dir))
    inc = IncrementalHistory(history_path)
    builds = 0
    while True:
        if inc.poll() > 0 or (builds == 0 and inc.rows):
            report = build_report(
                run_dir,
                out,
                history=inc.frame(),
                html_hook=lambda html: add_refresh(html, interval),
            )
            builds += 1
            if on_build is not None:
                on_build(report)
            if max_builds is not None and builds >= max_builds:
                break
        if should_stop():
            break
        sleep(interval)
    return builds


def watch_command(run_dir: Path, *, out: Path | None, interval: float) -> int:
    """``tdiag report RUN_DIR --watch``: exit 0 after Ctrl-C (or SIGTERM), 2 when the run
    folder cannot be read or the page written. One line per rebuild on stderr."""
    from tdiag.history import HistoryReadError

    stop = {"now": False}

    def _stop(signum: int, frame: Any) -> None:  # finish the page in progress, then end
        stop["now"] = True

    def _sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not stop["now"] and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def _built(report: dict[str, Any]) -> None:
        s = report.get("summary") or {}
        sys.stderr.write(
            f"tdiag report --watch: {s.get('rows', '?')} rows, {s.get('errors', 0)} errors, "
            f"{s.get('warnings', 0)} warnings -> {(out or run_dir)}\n"
        )
        sys.stderr.flush()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stderr.write(f"tdiag report --watch: watching {run_dir} every {interval:g} s\n")
        watch_report(
            run_dir, out, interval=interval, on_build=_built,
            should_stop=lambda: stop["now"], sleep=_sleep,
        )  # fmt: skip
    except ValueError as exc:
        sys.stderr.write(f"tdiag report --watch: {exc}\n")
        return 2
    except HistoryReadError as exc:
        sys.stderr.write(f"tdiag report --watch: cannot read the run at {run_dir}: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"tdiag report --watch: cannot write the report: {exc}\n")
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stderr.write("tdiag report --watch: stopped\n")
    return 0


def watch_cli(
    run_dirs: Sequence[Path], *, out: Path | None, interval: float, json_out: bool
) -> int:
    """The CLI's ``--watch``: one run folder, no ``--json`` (a page that keeps changing)."""
    if json_out:
        sys.stderr.write("tdiag report: --watch writes pages; it does not print --json\n")
        return 2
    if len(run_dirs) != 1:
        sys.stderr.write(f"tdiag report: --watch takes one run folder, got {len(run_dirs)}\n")
        return 2
    return watch_command(run_dirs[0], out=out, interval=interval)
