"""What the Monitor writes about the run (meta.json) and how it hears SIGTERM/SIGINT.

``meta.json`` (written atomically with :func:`tdiag.history.write_json_atomic` at start,
rewritten at close with the ``end`` block): ``config`` (the run config the loop passed),
``monitor`` (the Monitor's options), ``model`` (class, parameter counts total/trainable),
``environment`` (python, torch, tdiag versions, platform, hostname, device, world size),
``start_time``, and at close ``end`` (``steps``, ``time``, ``status``: completed | signal |
exception | nonfinite, ``sink_failures``) and ``perf`` (FLOPs per token, peak FLOP/s and
where it came from, or why there is no MFU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SignalFlag", "build_meta", "model_summary", "write_end_meta"]

logger = logging.getLogger(__name__)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Class name and parameter counts (shared/tied parameters counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"class": type(model).__name__, "params_total": total, "params_trainable": trainable}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    import tdiag

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tdiag": tdiag.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def build_meta(*, monitor: Any) -> dict[str, Any]:
    """The meta.json content at the start of a run of ``monitor`` (a Monitor)."""
    options = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(monitor.options).items()
    }
    options["clip_used"] = monitor.clip
    config = monitor.config
    return {
        "config": dict(config) if isinstance(config, dict) else config,
        "monitor": options,
        "model": model_summary(monitor.model),
        "environment": environment(model_device(monitor.model), monitor.rank.world_size),
        "start_time": time.time(),
    }


def write_end_meta(monitor: Any) -> None:
    """Rewrite meta.json (atomically) with the ``end`` and ``perf`` blocks of ``monitor``."""
    from tdiag.history import META_FILE, write_json_atomic

    end = {
        "steps": monitor.global_step,
        "time": time.time(),
        "status": monitor.status,
        **monitor.end_detail,
        "tokens": monitor.tokens_total,
        "sink_failures": [f.to_dict() for f in monitor.sinks.failures],
    }
    meta = {**monitor.meta, "end": end, "perf": monitor.perf_info}
    write_json_atomic(Path(monitor.run_dir) / META_FILE, meta)


class SignalFlag:
    """SIGTERM/SIGINT handlers that only record the signal.

    The Monitor reads :attr:`signum` in ``step()``/``close()``. A second signal while the
    first is pending leaves at once: ``KeyboardInterrupt`` for SIGINT, ``SystemExit(143)``
    for SIGTERM. Handlers are only installed from the main thread, and :meth:`restore`
    puts the previous ones back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            logger.info("tdiag: not in the main thread; SIGTERM/SIGINT are not handled")
            return False
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        return True

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: the user wants out now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        self.received_at = time.monotonic()

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            if prev is not None:
                signal.signal(sig, prev)
        self._previous.clear()

    @property
    def exit_code(self) -> int | None:
        """``128 + signum`` (143 for SIGTERM, 130 for SIGINT) once a signal was received."""
        return None if self.signum is None else 128 + self.signum


def guarded(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn``; log (never raise) an ``Exception``. Monitoring never stops training."""
    try:
        return fn()
    except Exception as exc:
        logger.warning("tdiag: %s failed (%s: %s); training goes on", what, type(exc).__name__, exc)
        logger.debug("traceback", exc_info=exc)
        return None


def pid_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "argv": list(sys.argv)}
