"""report.html in a real browser: headless Chromium opens it from disk (file://).

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON messages): no websocket client, no downloads.
Checks: no console error, no network request, every chart drawn with a nonzero size,
every in-page link lands on an element, no horizontal overflow at a phone's width (390 px);
screenshots are saved in the test's tmp folder.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped when it is absent.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tdiag.history import HistoryWriter
from tdiag.report import build_report

pytestmark = pytest.mark.browser

CHROMIUM = next(
    (
        p
        for p in (os.environ.get("TDIAG_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"))
        if p and Path(p).exists()
    ),
    None,
)


class DevTools:
    """A minimal Chrome DevTools Protocol client over the debugging pipe (fds 3 in, 4 out)."""

    def __init__(self, binary: str, user_data_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Move the child's ends above 3 and 4 first, so that dup2 onto 3/4 never hits its
        # own source (dup2(fd, fd) would keep close-on-exec and the child would lose it).
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire_fds() -> None:  # in the child, before exec: the protocol's fixed fd numbers
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            preexec_fn=wire_fds,  # the test process does not run threads here
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the debugging pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(
        self,
        method: str,
        params: dict | None = None,
        *,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


_PROBE = """
(() => {
  const visible = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const charts = [...document.querySelectorAll('figure.chart')].map(fig => {
    const svg = [...fig.querySelectorAll('svg')].find(visible);
    const r = svg ? svg.getBoundingClientRect() : null;
    return {id: fig.id, w: r ? r.width : 0, h: r ? r.height : 0,
            paths: svg ? svg.querySelectorAll('path, image, use').length : 0};
  });
  const imgs = [...document.querySelectorAll('img')].map(i => ({w: i.naturalWidth, h: i.naturalHeight}));
  const broken = [...document.querySelectorAll('a[href^="#"]')]
     .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id));
  const doc = document.documentElement;
  const wide = [...document.querySelectorAll('body *')].filter(el => {
     const r = el.getBoundingClientRect(); return r.width > 0 && r.right > doc.clientWidth + 1; })
     .slice(0, 5).map(el => el.tagName + '.' + el.className);
  // Rendered size of the text inside the charts (tick labels, legends, mark numbers).
  const sizes = [...document.querySelectorAll('figure.chart .lin svg text')]
     .map(t => t.getBoundingClientRect().height).filter(h => h > 0).sort((a, b) => a - b);
  const textPx = sizes.length ? sizes[Math.floor(sizes.length / 2)] : 0;
  return JSON.stringify({charts, imgs, broken, scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
     textPx, wide, findings: document.querySelectorAll('article.finding').length, title: document.title});
})()
"""


def _open(dt: DevTools, url: str, width: int, height: int, *, mobile: bool) -> tuple[str, dict]:
    target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        dt.send(f"{domain}.enable", session=session)
    dt.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        session=session,
    )
    dt.events.clear()
    dt.send("Page.navigate", {"url": url}, session=session)
    dt.wait_event("Page.loadEventFired")
    result = dt.send(
        "Runtime.evaluate", {"expression": _PROBE, "returnByValue": True}, session=session
    )
    return session, json.loads(result["result"]["value"])


def _problems(events: list[dict]) -> tuple[list[str], list[str]]:
    errors, requests = [], []
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", "")[:300])
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(("file:", "data:", "about:")):
                requests.append(url)
    return errors, requests


def _screenshot(dt: DevTools, session: str, path: Path) -> None:
    shot = dt.send(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def _make_run(run: Path) -> None:
    """A run with something for every chart and a few pathologies (NaN, spike, clipping)."""
    n = 600
    with HistoryWriter(run / "history.jsonl") as w:
        for s in range(1, n + 1):
            loss = 4.0 * math.exp(-s / 150) + 1.2 + 0.03 * math.sin(s) + (6.0 if s == 400 else 0.0)
            row = {
                "step": s, "time": 1.0e9 + 0.2 * s, "train/loss": math.nan if s == 550 else loss,
                "train/lr": 1e-3 * min(1.0, s / 50), "train/grad_norm": 0.5 + 0.1 * math.cos(s / 7),
                "train/grad_clip_frac": 0.0, "perf/tokens_per_sec": 4000 + 50 * math.sin(s / 13),
                "perf/step_time": 0.2, "perf/data_time": 0.01, "perf/mfu": 0.35,
                "sys/gpu_mem_allocated_gb": 10.0, "sys/gpu_mem_peak_gb": 12.0, "sys/gpu_util": 95.0,
                "sys/rss_gb": 2.0, "sys/cpu_percent": 50.0,
            }  # fmt: skip
            for layer in range(2):
                row[f"grad_norm/blocks.{layer}.mlp"] = 0.1 * (layer + 1)
            for layer in range(12):  # many layers: drawn as a heatmap
                row[f"act_rms/blocks.{layer}"] = 1.0 + layer * s / n
            w.write(row)
            if s % 100 == 0:
                w.write({"step": s, "val/loss": loss + 0.2})
    alert = {"id": "monitor.nonfinite", "severity": "error", "title": "NaN loss", "step": 550}
    (run / "events.jsonl").write_text(json.dumps(alert) + "\n")
    (run / "meta.json").write_text(
        json.dumps({"name": "browser <test> run", "config": {"grad_clip": 1.0, "lr": 1e-3}})
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)
def test_report_opens_cleanly_in_chromium(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    build_report(run)
    url = (run / "report.html").resolve().as_uri()
    dt = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        # Desktop width.
        session, page = _open(dt, url, 1280, 900, mobile=False)
        _screenshot(dt, session, tmp_path / "report-desktop.png")
        errors, requests = _problems(dt.events)
        assert errors == [], errors
        assert requests == [], requests
        assert page["title"].startswith("tdiag report")
        keys = {c["id"] for c in page["charts"]}
        assert {
            "chart-loss",
            "chart-lr",
            "chart-grad-norm",
            "chart-throughput",
            "chart-memory",
        } <= keys
        assert {"chart-layer-grad-norms", "chart-layer-act-rms", "chart-utilization"} <= keys
        for chart in page["charts"]:
            assert chart["w"] > 200 and chart["h"] > 80 and chart["paths"] > 0, chart
        assert all(i["w"] > 0 and i["h"] > 0 for i in page["imgs"]), page["imgs"]
        assert page["broken"] == [], page["broken"]
        assert page["scrollWidth"] <= page["clientWidth"] + 1, page["wide"]

        # The log-scale toggle (CSS only) shows the other rendering.
        dt.send(
            "Runtime.evaluate",
            {"expression": "document.getElementById('chart-loss-log').click()"},
            session=session,
        )
        probe = "(() => { const r = document.querySelector('#chart-loss .log svg').getBoundingClientRect(); return r.width * r.height; })()"
        shown = dt.send(
            "Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session
        )
        assert shown["result"]["value"] > 0

        # Phone width.
        session, phone = _open(dt, url, 390, 844, mobile=True)
        _screenshot(dt, session, tmp_path / "report-phone.png")
        errors, requests = _problems(dt.events)
        assert errors == [] and requests == [], (errors, requests)
        assert phone["scrollWidth"] <= phone["clientWidth"] + 1, phone["wide"]
        for chart in phone["charts"]:
            assert 0 < chart["w"] <= 390 and chart["h"] > 0, chart
        # Chart text stays legible on a phone (the SVGs scale down with their box).
        assert phone["textPx"] >= 10, phone["textPx"]
        assert page["textPx"] <= 24, page["textPx"]
    finally:
        dt.close()
    assert (tmp_path / "report-desktop.png").stat().st_size > 10_000
    assert (tmp_path / "report-phone.png").stat().st_size > 10_000
