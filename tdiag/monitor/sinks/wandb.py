"""Weights & Biases sink (optional: ``pip install tdiag[wandb]``).

``wandb`` is imported when the sink opens, not before. The run lives under the run folder
(``RUN_DIR/wandb/…``). Offline runs (``WANDB_MODE=offline`` in the environment, or
``mode="offline"``) never touch the network; ``wandb sync RUN_DIR/wandb/offline-run-*``
uploads them later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdiag.findings import Finding, to_jsonable
from tdiag.monitor.sinks.base import SinkUnavailable

__all__ = ["WandbSink"]


class WandbSink:
    """Log metrics to a wandb run created with ``wandb.init(dir=run_dir, **wandb_kwargs)``.

    The run's ``config`` defaults to the Monitor's ``meta`` (run config, parameter counts,
    environment) unless ``config=`` is given. Each ``write`` is one ``run.log(metrics,
    step=step)``. Findings go to the run summary under ``tdiag/findings/<id>`` (the latest
    occurrence: severity, step, title, where) and ``tdiag/findings_count``.

    Args:
        **wandb_kwargs: passed to ``wandb.init`` (``project``, ``name``, ``mode``, ``tags``, …).

    Raises:
        SinkUnavailable: from ``open`` when wandb is not installed (message says
            "install tdiag[wandb]"); the Monitor then disables this sink and goes on.
    """

    background = True  # may be called from tdiag's sink writer thread (sinks/background.py)

    def __init__(self, **wandb_kwargs: Any) -> None:
        self.wandb_kwargs = wandb_kwargs
        self.run: Any = None
        self._n_findings = 0

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise SinkUnavailable(
                f"wandb logging was requested but wandb cannot be imported ({exc}); "
                "install tdiag[wandb] (`pip install 'tdiag[wandb]'`) or pass wandb=None"
            ) from exc
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(self.wandb_kwargs)
        kwargs.setdefault("dir", str(run_dir))
        if meta:
            kwargs.setdefault("config", to_jsonable(dict(meta)))
        self.run = wandb.init(**kwargs)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.run is None:
            raise RuntimeError("WandbSink.write() before open()")
        self.run.log(dict(metrics), step=int(step))

    def event(self, finding: Finding) -> None:
        if self.run is None:
            raise RuntimeError("WandbSink.event() before open()")
        self._n_findings += 1
        self.run.summary[f"tdiag/findings/{finding.id}"] = {
            "severity": finding.severity.value,
            "step": finding.step,
            "title": finding.title,
            "where": finding.where,
        }
        self.run.summary["tdiag/findings_count"] = self._n_findings

    def close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()
