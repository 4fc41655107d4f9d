"""System metrics: CPU and process memory (psutil), GPU utilisation and memory (NVML), CUDA allocator.

:class:`SystemSampler` reads psutil and NVML in a background daemon thread that sleeps
(``Event.wait``) between samples, so it costs nothing while training runs; the Monitor reads
:meth:`SystemSampler.latest` on log steps. :func:`cuda_memory_stats` reads the CUDA caching
allocator's host-side counters: no stream synchronisation.

GB in every metric name means 2**30 bytes (GiB), as in ``torch.cuda.memory_summary``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psutil
import torch

__all__ = ["GB", "SystemSampler", "cuda_memory_stats"]

logger = logging.getLogger(__name__)

GB = float(2**30)


def _as_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def cuda_memory_stats(device: Any = None) -> dict[str, float]:
    """CUDA caching-allocator memory of ``device`` in GB (2**30 bytes); {} when not on CUDA.

    Keys: ``sys/gpu_mem_allocated_gb`` (memory held by live tensors),
    ``sys/gpu_mem_reserved_gb`` (allocated + cached by the allocator),
    ``sys/gpu_mem_peak_gb`` (peak allocated since start or the last
    ``torch.cuda.reset_peak_memory_stats``). These are host-side counters: reading them does
    not synchronise the stream.

    Args:
        device: a CUDA device (``torch.device``, ``"cuda:0"``, an index); None or a non-CUDA
            device gives {}.
    """
    dev = _as_device(device)
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "sys/gpu_mem_allocated_gb": torch.cuda.memory_allocated(dev) / GB,
        "sys/gpu_mem_reserved_gb": torch.cuda.memory_reserved(dev) / GB,
        "sys/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(dev) / GB,
    }


def _usable_cpus() -> int:
    try:
        return len(psutil.Process().cpu_affinity()) or 1  # CPUs this process may run on
    except (AttributeError, psutil.Error, OSError):  # no affinity API (macOS)
        return psutil.cpu_count() or 1


class _Nvml:
    """One NVML device handle; ``read()`` gives sys/gpu_util and sys/gpu_mem_used_gb."""

    def __init__(self, pynvml: Any, handle: Any) -> None:
        self.pynvml = pynvml
        self.handle = handle

    @classmethod
    def open(cls, device: torch.device) -> _Nvml | None:
        """The NVML handle of a CUDA device, or None (logged once at info) when unavailable."""
        try:
            import pynvml
        except ImportError:
            logger.info(
                "tdiag: GPU utilisation is not sampled: nvidia-ml-py is not installed "
                "(pip install 'tdiag[gpu]'); CUDA memory is still reported."
            )
            return None
        try:
            pynvml.nvmlInit()
            handle = cls._handle(pynvml, device)
        except (pynvml.NVMLError, OSError, RuntimeError, ValueError) as exc:
            logger.info(
                "tdiag: GPU utilisation is not sampled: NVML is not usable here (%s); "
                "CUDA memory is still reported.",
                exc,
            )
            return None
        return cls(pynvml, handle)

    @staticmethod
    def _handle(pynvml: Any, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        # CUDA and NVML number devices differently under CUDA_VISIBLE_DEVICES: the UUID is
        # the same in both, so prefer it.
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(
                    text if text.startswith(("GPU-", "MIG-")) else "GPU-" + text
                )
            except pynvml.NVMLError:
                pass
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if index < len(visible) and visible[index].strip().isdigit():
            index = int(visible[index])
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> dict[str, float]:
        util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self.pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"sys/gpu_util": float(util.gpu), "sys/gpu_mem_used_gb": mem.used / GB}

    def close(self) -> None:
        try:
            self.pynvml.nvmlShutdown()
        except self.pynvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", exc)


class SystemSampler:
    """Sample CPU, process memory and GPU utilisation in a background thread.

    Metrics (``latest()`` keys):

    - ``sys/cpu_percent``: this process's CPU use (all its threads) as a percent of the whole
      machine, 0–100 (psutil's per-process percent divided by the number of CPUs the process
      may run on).
    - ``sys/cpu_percent_system``: whole-machine CPU use, 0–100, averaged over logical CPUs.
    - ``sys/rss_gb``: this process's resident set size, GB (2**30 bytes).
    - ``sys/gpu_util`` (NVML, CUDA device only): percent of the last sample period (1/6 s
      to 1 s, driver-defined) during which a kernel was running on the GPU, 0–100.
    - ``sys/gpu_mem_used_gb`` (NVML, CUDA device only): device memory used by all processes,
      GB; includes the CUDA context, unlike the allocator's ``sys/gpu_mem_reserved_gb``.

    ``start()`` takes a first sample at once (memory and GPU keys); CPU percentages are
    averages over the interval since the previous sample, so they appear after one interval. NVML absent or unusable: logged once at info level,
    GPU keys are omitted, nothing fails.

    Args:
        interval_s: seconds between samples (the thread sleeps in between).
        device: the training device; NVML is opened only when it is a CUDA device.
    """

    def __init__(self, interval_s: float = 2.0, device: Any = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.device = _as_device(device)
        self._process = psutil.Process()
        self._n_cpus = _usable_cpus()
        self._nvml: _Nvml | None = None
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self.samples = 0

    def start(self) -> SystemSampler:
        """Start the thread (idempotent). Returns self."""
        if self._thread is not None:
            return self
        if self.device is not None and self.device.type == "cuda":
            self._nvml = _Nvml.open(self.device)
        # A first sample at once, so the first log step has memory and GPU numbers; its CPU
        # percentages are dropped: the first psutil percent calls only set the reference point.
        if self._safe_sample():
            with self._lock:
                for key in ("sys/cpu_percent", "sys/cpu_percent_system"):
                    self._latest.pop(key, None)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tdiag-system-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and release NVML (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def latest(self) -> dict[str, float]:
        """The most recent sample (a copy; {} before the first one)."""
        with self._lock:
            return dict(self._latest)

    def sample(self) -> dict[str, float]:
        """Take one sample now (also what the thread calls) and make it the latest."""
        out: dict[str, float] = {}
        with self._process.oneshot():
            # Clamped: CPU time advances in clock ticks (10 ms), so over a very short interval
            # between two samples one tick can read as several hundred percent.
            share = self._process.cpu_percent(None) / self._n_cpus
            out["sys/cpu_percent"] = min(100.0, max(0.0, share))
            out["sys/rss_gb"] = self._process.memory_info().rss / GB
        out["sys/cpu_percent_system"] = psutil.cpu_percent(None)
        if self._nvml is not None:
            out.update(self._read_nvml())
        with self._lock:
            self._latest = out
            self.samples += 1
        return out

    def _read_nvml(self) -> dict[str, float]:
        """The GPU keys, or {} after turning NVML off for good when it fails: an
        ``NVMLError`` (GPU lost, driver reset) is logged at info, anything else the binding
        raises (a ctypes error, a broken wrapper) once as a warning. Either way the CPU and
        memory keys of this and later samples go on (a raising NVML must not freeze them)."""
        nvml = self._nvml
        assert nvml is not None
        try:
            return nvml.read()
        except nvml.pynvml.NVMLError as exc:
            logger.info("tdiag: NVML stopped answering (%s); GPU utilisation is off.", exc)
        except Exception as exc:  # a background sampler must never take training down
            logger.warning(
                "tdiag: NVML failed (%s: %s); GPU utilisation is off, CPU and memory go on.",
                type(exc).__name__,
                exc,
            )
        self._nvml = None
        try:
            nvml.close()
        except Exception as exc:  # already reported; just release what we can
            logger.debug("closing NVML after its failure failed: %r", exc)
        return {}

    def _safe_sample(self) -> bool:
        try:
            self.sample()
        except Exception as exc:  # a background sampler must never take training down
            if not self._failed:
                self._failed = True
                logger.warning(
                    "tdiag: system sampling failed (%s: %s); retrying quietly.",
                    type(exc).__name__,
                    exc,
                )
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):  # idle between samples
            self._safe_sample()

    def __enter__(self) -> SystemSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
