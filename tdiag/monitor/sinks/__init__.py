"""Where the Monitor's metrics and live Findings go: history.jsonl, TensorBoard, wandb, console.

Every sink follows the :class:`Sink` protocol; the Monitor talks to one :class:`MultiSink`,
which disables (and reports once) any sink that raises, so monitoring never stops training.
"""

from __future__ import annotations

from tdiag.monitor.sinks.base import MultiSink, NullSink, Sink, SinkFailure, SinkUnavailable
from tdiag.monitor.sinks.console import ConsoleSink
from tdiag.monitor.sinks.jsonl import JsonlSink
from tdiag.monitor.sinks.tensorboard import TensorBoardSink
from tdiag.monitor.sinks.wandb import WandbSink

__all__ = [
    "ConsoleSink",
    "JsonlSink",
    "MultiSink",
    "NullSink",
    "Sink",
    "SinkFailure",
    "SinkUnavailable",
    "TensorBoardSink",
    "WandbSink",
]
