"""TensorBoard sink: scalars per log step and Findings as text, under ``RUN_DIR/tensorboard``.

Scalars only: ``add_histogram`` costs 2–8 ms per tensor (docs/performance.md), so
histograms never run on the Monitor's path. All the scalars of one log step go out as one
``Summary`` event (one protobuf, one queue put): ``SummaryWriter.add_scalar`` per metric
costs ~30 µs each, which for a few hundred per-layer metrics would be milliseconds per log
step. ``tensorboard --logdir RUN_DIR`` shows the run.
"""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdiag.findings import Finding, to_jsonable
from tdiag.monitor.sinks.base import SinkUnavailable

__all__ = ["TENSORBOARD_DIR", "TensorBoardSink"]

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Write every metric as a TensorBoard scalar (tag = metric name) and Findings as text.

    Findings go to the text tag ``tdiag/findings`` (one entry per Finding, at its step);
    the run's ``meta`` goes to ``tdiag/meta`` at step 0. Non-numeric values are skipped.

    Args:
        subdir: folder under the run folder for the event files.
        flush_secs: how often TensorBoard's writer thread flushes to disk (it also flushes
            on ``close``).
    """

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
            from torch.utils.tensorboard.writer import FileWriter
        except ImportError as exc:
            raise SinkUnavailable(
                f"TensorBoard logging needs the `tensorboard` package ({exc}); "
                "install it (`pip install tensorboard`) or pass tensorboard=False"
            ) from exc
        self._summary, self._text = Summary, text
        self.log_dir = Path(run_dir) / self.subdir
        self._writer = FileWriter(str(self.log_dir), flush_secs=self.flush_secs)
        if meta:
            text_meta = json.dumps(to_jsonable(dict(meta)), indent=2, allow_nan=False)
            # Indented by 4 spaces: TensorBoard renders text as markdown; this keeps it verbatim.
            self._add_text("tdiag/meta", "    " + text_meta.replace("\n", "\n    "), 0)

    def _add_text(self, tag: str, body: str, step: int) -> None:
        self._writer.add_summary(self._text(tag, body), step, time.time())

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
            self._writer.add_summary(self._summary(value=values), step, time.time())

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
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
