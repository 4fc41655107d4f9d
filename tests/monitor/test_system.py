"""SystemSampler (psutil, NVML through a fake pynvml) and cuda_memory_stats (fake torch.cuda)."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
import uuid

import psutil
import pytest
import torch

from tdiag.monitor.system import GB, SystemSampler, cuda_memory_stats

GPU_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


class FakeNVMLError(Exception):
    pass


def make_fake_pynvml(*, util: int = 57, used_gb: float = 3.0, fail_init: bool = False):
    """A stand-in for nvidia-ml-py with the calls the sampler makes, recording them."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError
    nv.calls = []
    nv.fail_reads = False

    def nvmlInit():
        nv.calls.append(("init",))
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def by_uuid(text):
        nv.calls.append(("uuid", text))
        if text != f"GPU-{GPU_UUID}":
            raise FakeNVMLError("Not Found")
        return "handle-by-uuid"

    def by_index(index):
        nv.calls.append(("index", index))
        return f"handle-{index}"

    def utilization(handle):
        if nv.fail_reads:
            raise FakeNVMLError("GPU is lost")
        return types.SimpleNamespace(gpu=util, memory=10)

    def memory(handle):
        return types.SimpleNamespace(used=int(used_gb * GB), total=int(80 * GB), free=0)

    nv.nvmlInit = nvmlInit
    nv.nvmlShutdown = lambda: nv.calls.append(("shutdown",))
    nv.nvmlDeviceGetHandleByUUID = by_uuid
    nv.nvmlDeviceGetHandleByIndex = by_index
    nv.nvmlDeviceGetUtilizationRates = utilization
    nv.nvmlDeviceGetMemoryInfo = memory
    return nv


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as if one GPU with a known UUID were present."""
    props = types.SimpleNamespace(uuid=GPU_UUID, name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    return props


def test_cpu_sample_has_psutil_metrics_and_no_gpu_keys():
    sampler = SystemSampler(interval_s=1.0, device="cpu")
    sampler.start()
    try:
        out = sampler.sample()
    finally:
        sampler.stop()
    assert set(out) == {"sys/cpu_percent", "sys/cpu_percent_system", "sys/rss_gb"}
    assert 0.0 <= out["sys/cpu_percent"] <= 100.0
    assert 0.0 <= out["sys/cpu_percent_system"] <= 100.0
    rss = psutil.Process().memory_info().rss / GB
    assert out["sys/rss_gb"] == pytest.approx(rss, rel=0.2)
    assert sampler.latest() == out


def test_cpu_percent_is_this_process_share_of_the_machine():
    sampler = SystemSampler(interval_s=1.0)
    sampler.start()
    t0 = time.process_time()
    deadline = time.perf_counter() + 0.3
    x = 0
    while time.perf_counter() < deadline:  # keep one core busy
        x += 1
    busy = time.process_time() - t0
    out = sampler.sample()
    sampler.stop()
    n_cpus = len(psutil.Process().cpu_affinity())
    expected = 100.0 * busy / 0.3 / n_cpus
    assert out["sys/cpu_percent"] == pytest.approx(expected, abs=25.0 / n_cpus + 5)
    assert out["sys/cpu_percent"] > 10.0 / n_cpus


def test_thread_samples_periodically_is_idle_between_and_stops():
    sampler = SystemSampler(interval_s=0.05)
    assert sampler.latest() == {}
    sampler.start()
    sampler.start()  # idempotent
    thread = sampler._thread
    assert thread is not None and thread.daemon and thread.name == "tdiag-system-sampler"
    time.sleep(0.5)
    # The thread's own CPU time: it sleeps in Event.wait between samples.
    cpu = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    thread_cpu = cpu.get(thread.native_id, 0.0)
    sampler.stop()
    assert not thread.is_alive()
    assert 3 <= sampler.samples <= 12
    assert thread_cpu < 0.2
    assert "sys/rss_gb" in sampler.latest()
    n = sampler.samples
    time.sleep(0.15)
    assert sampler.samples == n  # stopped means stopped
    sampler.stop()  # idempotent


def test_start_takes_a_first_sample_without_meaningless_cpu_percentages():
    sampler = SystemSampler(interval_s=60.0).start()
    first = sampler.latest()
    sampler.stop()
    assert set(first) == {"sys/rss_gb"}  # CPU % needs an interval to average over


def test_latest_is_a_copy():
    sampler = SystemSampler()
    sampler.sample()
    sampler.latest()["sys/rss_gb"] = -1.0
    assert sampler.latest()["sys/rss_gb"] > 0


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError, match="0"):
        SystemSampler(interval_s=0)


def test_a_failing_sample_is_logged_once_and_the_thread_goes_on(monkeypatch, caplog):
    sampler = SystemSampler(interval_s=0.02)
    calls = []

    def broken():
        calls.append(1)
        raise psutil.AccessDenied(pid=1)

    monkeypatch.setattr(sampler, "sample", broken)
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.system"):
        sampler.start()
        time.sleep(0.2)
        alive = sampler._thread.is_alive()
        sampler.stop()
    assert alive and len(calls) >= 3
    assert len([r for r in caplog.records if "sampling failed" in r.getMessage()]) == 1


# ---- NVML ------------------------------------------------------------------------------------


def test_nvml_gpu_util_and_memory_on_a_cuda_device(monkeypatch, fake_cuda):
    nv = make_fake_pynvml(util=57, used_gb=3.0)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    sampler = SystemSampler(interval_s=10.0, device=torch.device("cuda", 0)).start()
    out = sampler.sample()
    sampler.stop()
    assert out["sys/gpu_util"] == 57.0
    assert out["sys/gpu_mem_used_gb"] == pytest.approx(3.0)
    assert ("uuid", f"GPU-{GPU_UUID}") in nv.calls  # matched by UUID, not by index
    assert nv.calls[-1] == ("shutdown",)


def test_nvml_maps_cuda_visible_devices_when_uuid_is_unknown(monkeypatch, fake_cuda):
    nv = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    fake_cuda.uuid = uuid.UUID(int=1)  # NVML does not know it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    sampler = SystemSampler(device="cuda:1").start()
    sampler.stop()
    assert ("index", 5) in nv.calls


def test_no_nvml_on_cpu_even_if_installed(monkeypatch):
    nv = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    sampler = SystemSampler(device="cpu").start()
    out = sampler.sample()
    sampler.stop()
    assert nv.calls == [] and "sys/gpu_util" not in out


def test_nvml_missing_is_one_info_log_not_a_crash(monkeypatch, fake_cuda, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with caplog.at_level(logging.INFO, logger="tdiag.monitor.system"):
        sampler = SystemSampler(interval_s=0.02, device="cuda").start()
        time.sleep(0.1)
        out = sampler.latest()
        sampler.stop()
    infos = [r for r in caplog.records if "nvidia-ml-py" in r.getMessage()]
    assert len(infos) == 1 and infos[0].levelno == logging.INFO
    assert "sys/rss_gb" in out and "sys/gpu_util" not in out


def test_nvml_init_failure_is_one_info_log(monkeypatch, fake_cuda, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(fail_init=True))
    with caplog.at_level(logging.INFO, logger="tdiag.monitor.system"):
        sampler = SystemSampler(device="cuda").start()
        out = sampler.sample()
        sampler.stop()
    assert "Driver Not Loaded" in caplog.text
    assert "sys/gpu_util" not in out and "sys/cpu_percent" in out


def test_nvml_failing_mid_run_turns_gpu_sampling_off(monkeypatch, fake_cuda, caplog):
    nv = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    sampler = SystemSampler(device="cuda").start()
    assert "sys/gpu_util" in sampler.sample()
    nv.fail_reads = True
    with caplog.at_level(logging.INFO, logger="tdiag.monitor.system"):
        out = sampler.sample()
        out2 = sampler.sample()
    sampler.stop()
    assert "sys/gpu_util" not in out and "sys/rss_gb" in out and "sys/gpu_util" not in out2
    assert caplog.text.count("GPU is lost") == 1


# ---- CUDA allocator --------------------------------------------------------------------------


def test_cuda_memory_stats_is_empty_off_cuda():
    assert cuda_memory_stats(None) == {}
    assert cuda_memory_stats("cpu") == {}
    assert cuda_memory_stats(torch.device("meta")) == {}


def test_cuda_memory_stats_reads_the_allocator_counters(monkeypatch, fake_cuda):
    seen = []

    def counter(value):
        def read(device):
            seen.append(device)
            return value

        return read

    monkeypatch.setattr(torch.cuda, "memory_allocated", counter(1 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", counter(3 * 2**29))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", counter(2 * 2**30))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("no sync needed"))
    out = cuda_memory_stats("cuda:1")
    assert out == {
        "sys/gpu_mem_allocated_gb": 1.0,
        "sys/gpu_mem_reserved_gb": 1.5,
        "sys/gpu_mem_peak_gb": 2.0,
    }
    assert seen == [torch.device("cuda", 1)] * 3
    assert cuda_memory_stats(1) == out  # an index means a CUDA device


def test_no_thread_leaks_after_context_manager():
    before = threading.active_count()
    with SystemSampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
    assert threading.active_count() == before
    assert sampler.samples >= 1


def test_nvml_raising_a_non_nvml_error_keeps_cpu_and_memory_updating(
    monkeypatch, fake_cuda, caplog
):
    """A binding that raises something else than NVMLError (here RuntimeError) turns GPU
    sampling off with one warning; CPU and RSS keep coming from every later sample."""
    nv = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)

    def broken(handle):
        raise RuntimeError("ctypes call failed")

    sampler = SystemSampler(interval_s=0.02, device="cuda").start()
    nv.nvmlDeviceGetUtilizationRates = broken
    with caplog.at_level(logging.INFO, logger="tdiag.monitor.system"):
        deadline = time.monotonic() + 5.0
        first = sampler.samples
        while sampler.samples < first + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        counted = sampler.samples
        out = sampler.latest()
        # the process's memory changes; the next samples must see it (not a frozen copy)
        ballast = bytearray(64 * 2**20)
        ballast[::4096] = b"x" * len(ballast[::4096])
        while sampler.samples < counted + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        after = sampler.latest()
        sampler.stop()
    del ballast
    assert sampler.samples >= counted + 3, "the sampler stopped sampling"
    assert "sys/cpu_percent" in out and "sys/rss_gb" in out and "sys/gpu_util" not in out
    assert after["sys/rss_gb"] > out["sys/rss_gb"]
    warnings = [r for r in caplog.records if "NVML failed" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: ctypes call failed" in warnings[0].getMessage()
    assert "sampling failed" not in caplog.text  # not the generic, freezing path
    assert ("shutdown",) in nv.calls
