"""TensorBoard sink: scalars per log step and Findings as text, under ``RUN_DIR/tensorboard``.

Scalars only: ``add_histogram`` costs 2–8 ms per tensor (docs/performance.md), so
histograms never run on the Monitor's path. All the scalars of one log step go out as one
``Summary`` event (one protobuf, one queue put): ``SummaryWriter.add_scalar`` per metric
costs ~30 µs each, which for a few hundred per-layer metrics would be milliseconds per log
step. ``tensorboard --logdir RUN_DIR`` shows the run.

The event file is written with TensorBoard's own record format (``RecordWriter``, the
``Event`` protobuf) but without its writer thread: the Monitor already calls this sink from
tdiag's background sink thread (sinks/background.py), and TensorBoard's thread, on a full
disk, died with an uncaught traceback printed before tdiag's warning. Here a failing write
raises ``OSError`` in ``write``/``close`` itself: one warning, the sink disabled, no traceback.
"""

from __future__ import annotations

import json
import numbers
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from tdiag.findings import Finding, to_jsonable
from tdiag.monitor.sinks.base import SinkUnavailable

__all__ = ["TENSORBOARD_DIR", "TensorBoardSink"]

TENSORBOARD_DIR = "tensorboard"


def _masked(crc: int) -> int:
    """TFRecord's masked CRC-32C (the record format's definition)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _fast_records(file: IO[bytes]) -> Callable[[bytes], None] | None:
    """A TFRecord writer on ``file`` using google-crc32c's C CRC-32C, or None without it.

    TensorBoard's own ``RecordWriter`` computes the CRC in pure Python: ~170 µs for the
    1.5 KB event of a 50-metric row, more than the rest of the sink; the C one takes <1 µs.
    Same bytes (tests/monitor/test_tensorboard_sink.py compares them).
    """
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation != "c":  # its pure-Python fallback is no faster
        return None
    crc, pack = google_crc32c.value, struct.pack

    def write(data: bytes) -> None:
        header = pack("<Q", len(data))
        file.write(b"".join((header, pack("<I", _masked(crc(header))), data,
                             pack("<I", _masked(crc(data))))))  # fmt: skip

    return write


class _EventFile:
    """One TensorBoard event file: ``Event`` protobufs as TFRecords, buffered, flushed every
    ``flush_secs`` and on close. Errors (a full disk) raise from the call that hit them."""

    def __init__(self, log_dir: Path, flush_secs: float) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event = event_pb2.Event
        log_dir.mkdir(parents=True, exist_ok=True)
        # The name TensorBoard's own writer gives (its loader finds files by "tfevents").
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        n = 0
        while (log_dir / f"{name}.{n}").exists():
            n += 1
        self.path = log_dir / f"{name}.{n}"
        self._file: IO[bytes] | None = open(self.path, "xb")  # noqa: SIM115
        self._write_record = _fast_records(self._file) or RecordWriter(self._file).write
        self._flush_secs = flush_secs
        self._next_flush = 0.0  # the first event goes to disk at once
        self.add(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: Any) -> None:
        if self._file is None:
            raise ValueError(f"TensorBoard event file {self.path} is closed")
        self._write_record(event.SerializeToString())
        now = time.monotonic()
        if now >= self._next_flush:
            self._file.flush()
            self._next_flush = now + self._flush_secs

    def summary(self, summary: Any, step: int) -> None:
        self.add(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.flush()
            finally:
                file.close()


class TensorBoardSink:
    """Write every metric as a TensorBoard scalar (tag = metric name) and Findings as text.

    Findings go to the text tag ``tdiag/findings`` (one entry per Finding, at its step);
    the run's ``meta`` goes to ``tdiag/meta`` at step 0. Non-numeric values are skipped.

    Args:
        subdir: folder under the run folder for the event files.
        flush_secs: how often the event file is flushed to disk (also on ``close``).
    """

    background = True  # may be called from tdiag's sink writer thread (sinks/background.py)

    def __init__(self, *, subdir: str = TENSORBOARD_DIR, flush_secs: int = 30) -> None:
        self.subdir = subdir
        self.flush_secs = flush_secs
        self.log_dir: Path | None = None
        self._writer: Any = None
        self._summary: Any = None
        self._text: Any = None

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard.summary import text
        except ImportError as exc:
            raise SinkUnavailable(
                f"TensorBoard logging needs the `tensorboard` package ({exc}); "
                "install it (`pip install tensorboard`) or pass tensorboard=False"
            ) from exc
        self._summary, self._text = Summary, text
        self.log_dir = Path(run_dir) / self.subdir
        self._writer = _EventFile(self.log_dir, self.flush_secs)
        if meta:
            text_meta = json.dumps(to_jsonable(dict(meta)), indent=2, allow_nan=False)
            # Indented by 4 spaces: TensorBoard renders text as markdown; this keeps it verbatim.
            self._add_text("tdiag/meta", "    " + text_meta.replace("\n", "\n    "), 0)

    def _add_text(self, tag: str, body: str, step: int) -> None:
        self._writer.summary(self._text(tag, body), step)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            raise RuntimeError("TensorBoardSink.write() before open()")
        value = self._summary.Value
        values = [
            value(tag=name, simple_value=float(v))
            for name, v in metrics.items()
            # numbers only (numpy scalars included); strings, bools etc. are skipped
            if isinstance(v, numbers.Real) and not isinstance(v, bool)
        ]
        if values:
            self._writer.summary(self._summary(value=values), step)

    def event(self, finding: Finding) -> None:
        if self._writer is None:
            raise RuntimeError("TensorBoardSink.event() before open()")
        where = f" at `{finding.where}`" if finding.where else ""
        lines = [f"**{finding.severity.value.upper()}** `{finding.id}`: {finding.title}{where}"]
        if finding.message:
            lines.append(finding.message)
        if finding.recommendation:
            lines.append(f"Recommendation: {finding.recommendation}")
        step = finding.step if finding.step is not None else 0
        self._add_text("tdiag/findings", "\n\n".join(lines), step)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
