"""report.html in a real browser: headless Chromium opens it from disk (file://).

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON messages): no websocket client, no downloads.
Checks: no console error, no CSP violation, no network request, every chart drawn with a
nonzero size, every in-page link lands on an element, no horizontal overflow at a phone's
width (390 px); and the charts' interactions: hover shows step and value, a drag zooms the
x axis and "reset zoom" restores it, the log toggle, the smoothing slider (the page's EMA
equals :func:`tdiag.report.charts.debiased_ema`), heatmap hover, CSV export. Screenshots
are saved in the test's tmp folder (``TDIAG_SCREENSHOTS=DIR`` copies them there).

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

import numpy as np
import pytest

from tdiag.history import HistoryWriter
from tdiag.report import build_report
from tdiag.report.charts import debiased_ema

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
    const canvas = [...fig.querySelectorAll('canvas')].find(visible);
    const r = canvas ? canvas.getBoundingClientRect() : null;
    return {id: fig.id, w: r ? r.width : 0, h: r ? r.height : 0,
            drawn: fig.querySelector('[data-drawn="1"]') !== null,
            canvases: fig.querySelectorAll('canvas').length};
  });
  const imgs = [...document.querySelectorAll('img')].map(i => ({w: i.naturalWidth, h: i.naturalHeight}));
  const broken = [...document.querySelectorAll('a[href^="#"]')]
     .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id));
  const doc = document.documentElement;
  const wide = [...document.querySelectorAll('body *')].filter(el => {
     const r = el.getBoundingClientRect(); return r.width > 0 && r.right > doc.clientWidth + 1; })
     .slice(0, 5).map(el => el.tagName + '.' + el.className);
  // Rendered size of the text around the charts (legends, controls).
  const sizes = [...document.querySelectorAll('figure.chart .u-legend th, figure.chart .tools')]
     .map(t => parseFloat(getComputedStyle(t).fontSize)).filter(h => h > 0).sort((a, b) => a - b);
  const textPx = sizes.length ? sizes[Math.floor(sizes.length / 2)] : 0;
  return JSON.stringify({charts, imgs, broken, scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
     textPx, wide, findings: document.querySelectorAll('article.finding').length, title: document.title,
     csp: window.__csp || []});
})()
"""


_CSP_LISTENER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


def _eval(dt: DevTools, session: str, expr: str) -> Any:
    result = dt.send(
        "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session
    )
    if "exceptionDetails" in result:
        raise AssertionError(f"{expr[:80]}: {result['exceptionDetails']}")
    return result["result"].get("value")


def _box(dt: DevTools, session: str, selector: str) -> dict:
    """Scroll ``selector`` into view and return its viewport rectangle."""
    expr = f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
      e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
      return {{x: r.x, y: r.y, w: r.width, h: r.height}}; }})()"""
    return _eval(dt, session, expr)


def _mouse(dt: DevTools, session: str, kind: str, x: float, y: float, **kw: Any) -> None:
    params = {"type": kind, "x": x, "y": y, "button": kw.pop("button", "none"), **kw}
    dt.send("Input.dispatchMouseEvent", params, session=session)


def _open(dt: DevTools, url: str, width: int, height: int, *, mobile: bool) -> tuple[str, dict]:
    target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        dt.send(f"{domain}.enable", session=session)
    # Record CSP violations (DevTools-injected scripts are not subject to the page's CSP).
    dt.send(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": _CSP_LISTENER},
        session=session,
    )
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


def _check_interactions(dt: DevTools, session: str, downloads: Path) -> None:
    """Hover, zoom and reset, log scale, smoothing, x axis, heatmap hover, CSV export."""
    ev = lambda expr: _eval(dt, session, expr)  # noqa: E731
    # Hover the middle of the loss chart: the legend shows the step and the values there.
    over = _box(dt, session, "#chart-loss .u-over")
    _mouse(dt, session, "mouseMoved", over["x"] + over["w"] / 2, over["y"] + over["h"] / 2)
    shown = ev(
        "[...document.querySelectorAll('#chart-loss .u-legend .u-value')].map(e => e.textContent)"
    )
    step, raw, smooth = (float(v) for v in shown[:3])
    assert 200 < step < 400 and 1.0 < raw < 5.0 and 1.0 < smooth < 5.0, shown

    # Drag across the second quarter: the x axis zooms there; "reset zoom" restores it.
    box = "document.querySelector('#chart-loss .plot').dataset"
    full = (float(ev(box + ".xMin")), float(ev(box + ".xMax")))
    assert full == (1.0, 600.0), full
    y = over["y"] + over["h"] / 2
    _mouse(
        dt, session, "mousePressed", over["x"] + over["w"] * 0.25, y, button="left", clickCount=1
    )
    _mouse(dt, session, "mouseMoved", over["x"] + over["w"] * 0.4, y, button="left", buttons=1)
    _mouse(dt, session, "mouseMoved", over["x"] + over["w"] * 0.5, y, button="left", buttons=1)
    _mouse(
        dt, session, "mouseReleased", over["x"] + over["w"] * 0.5, y, button="left", clickCount=1
    )
    zoomed = (float(ev(box + ".xMin")), float(ev(box + ".xMax")))
    assert 100 < zoomed[0] < 200 and 250 < zoomed[1] < 350, zoomed
    assert "step 1" in ev("document.querySelector('#chart-loss .range').textContent")
    ev("document.querySelector('#chart-loss button.reset').click()")
    assert (float(ev(box + ".xMin")), float(ev(box + ".xMax"))) == full

    # The facts of the old charts: NaN marks, the clip threshold, validation points.
    extra = ev(
        "[...document.querySelectorAll('figure.chart .extra-legend')].map(e => e.textContent)"
    )
    assert any("non-finite loss (1)" in t for t in extra), extra
    assert any("clip threshold 1" in t for t in extra), extra
    assert ev("tdiag.charts['grad-norm'].plots[0].scales.y.max") >= 1.0  # the line is in view
    assert ev("tdiag.charts.loss.spec.series[1].points") is True  # validation drawn as dots

    # A click on a legend entry hides that series, a second one shows it again.
    entry = "document.querySelectorAll('#chart-loss .u-legend .u-series')[1].querySelector('th')"
    ev(entry + ".click()")
    assert ev("tdiag.charts.loss.plots[0].series[1].show") is False
    ev(entry + ".click()")
    assert ev("tdiag.charts.loss.plots[0].series[1].show") is True

    # Log scale on every line chart, a log colour scale on heatmaps.
    assert ev("document.querySelectorAll('figure.chart .log-toggle').length") == ev(
        "document.querySelectorAll('figure.chart').length"
    )
    ev("document.querySelector('#chart-loss .log-toggle').click()")
    assert ev("tdiag.charts.loss.plots[0].scales.y.distr") == 3

    # The smoothing slider: the page's smoothed line is TensorBoard's debiased EMA.
    ev("""(() => { const s = document.querySelector('#chart-loss .smoothing input');
      s.value = '0.9'; s.dispatchEvent(new Event('input')); })()""")
    page_raw = ev("tdiag.charts.loss.plots[0].data[1]")
    page_smooth = ev("tdiag.charts.loss.plots[0].data[2]")
    nan = lambda v: math.nan if v is None else v  # noqa: E731
    want = debiased_ema(np.array([nan(v) for v in page_raw]), 0.9)
    np.testing.assert_allclose([nan(v) for v in page_smooth], want, rtol=1e-9, equal_nan=True)

    # The x axis by wall-clock time.
    ev("""(() => { const s = document.querySelector('#chart-loss select.x-axis');
      s.value = 'time'; s.dispatchEvent(new Event('change')); })()""")
    assert ev("document.querySelector('#chart-loss .range').textContent").startswith("wall-clock")

    # Heatmap hover names the layer, the steps and the value.
    heat = _box(dt, session, "#chart-layer-act-rms canvas")
    _mouse(dt, session, "mouseMoved", heat["x"] + heat["w"] * 0.8, heat["y"] + heat["h"] * 0.5)
    tip = ev(
        "(() => { const t = document.querySelector('#chart-layer-act-rms .tdtip'); return t.hidden ? '' : t.textContent; })()"
    )
    assert "blocks." in tip and "step" in tip and "max" in tip, tip

    # CSV export of a chart's data: a real download (into ``downloads``), blob captured.
    dt.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    ev("""(() => { window.__blobs = []; const make = URL.createObjectURL;
      URL.createObjectURL = b => { window.__blobs.push(b); return make(b); };
      document.querySelector('#chart-grad-norm button.csv').click(); })()""")
    csv = dt.send(
        "Runtime.evaluate",
        {"expression": "window.__blobs[0].text()", "awaitPromise": True, "returnByValue": True},
        session=session,
    )["result"]["value"]
    lines = csv.strip().split("\n")
    assert lines[0] == "step,grad norm,fraction of steps clipped", lines[0]
    assert len(lines) == 601 and lines[1].startswith("1,"), (len(lines), lines[1])
    deadline = time.monotonic() + 20
    while not (downloads / "grad-norm.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (downloads / "grad-norm.csv").read_text() == csv


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
        assert page["csp"] == [], page["csp"]
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
            assert chart["drawn"] and chart["w"] > 200 and chart["h"] > 80, chart
        assert all(i["w"] > 0 and i["h"] > 0 for i in page["imgs"]), page["imgs"]
        assert page["broken"] == [], page["broken"]
        assert page["scrollWidth"] <= page["clientWidth"] + 1, page["wide"]

        _check_interactions(dt, session, tmp_path / "downloads")
        _screenshot(dt, session, tmp_path / "report-desktop-after.png")
        errors, requests = _problems(dt.events)
        assert errors == [] and requests == [], (errors, requests)
        assert _eval(dt, session, "window.__csp") == []

        # Phone width.
        session, phone = _open(dt, url, 390, 844, mobile=True)
        _screenshot(dt, session, tmp_path / "report-phone.png")
        errors, requests = _problems(dt.events)
        assert errors == [] and requests == [], (errors, requests)
        assert phone["csp"] == [], phone["csp"]
        assert phone["scrollWidth"] <= phone["clientWidth"] + 1, phone["wide"]
        for chart in phone["charts"]:
            assert chart["drawn"] and 0 < chart["w"] <= 390 and chart["h"] > 0, chart
        # Text around the charts stays legible on a phone.
        assert phone["textPx"] >= 10, phone["textPx"]
        assert page["textPx"] <= 24, page["textPx"]
    finally:
        dt.close()
    shots = [tmp_path / f"report-{n}.png" for n in ("desktop", "desktop-after", "phone")]
    for shot in shots:
        assert shot.stat().st_size > 10_000
    if os.environ.get("TDIAG_SCREENSHOTS"):
        out = Path(os.environ["TDIAG_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, out / shot.name)


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)
def test_the_public_chart_api_draws_a_page_of_overlaid_runs(tmp_path):
    """What ``tdiag compare`` does: runs overlaid by tokens, marks, a page of its own."""
    from markupsafe import Markup

    from tdiag.report.charts import (
        Mark,
        Series,
        chart_data_script,
        chart_figure,
        line_chart,
        page_assets,
    )

    a = Series("train/loss", [0, 4096, 8192, 12288], [3.0, 2.0, 1.5, 1.2], run="base", smooth=True)
    b = Series("train/loss", [0, 8192, 16384], [3.1, 2.5, 2.0], run="<b>big</b>", smooth=True)
    chart = line_chart(
        "cmp-loss", "Loss", [a, b], xlabel="tokens", marks=[Mark(8192, "b leaves a", "#6a1b9a")]
    )
    assets = page_assets(extra_css="body { font: 14px sans-serif; }")
    page = Markup(
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="{csp}">{style}</head>'
        "<body>{figure}{data}{scripts}</body></html>"
    ).format(
        csp=assets.csp,
        style=assets.style,
        figure=chart_figure(chart),
        data=chart_data_script([chart]),
        scripts=assets.scripts,
    )
    path = tmp_path / "compare.html"
    path.write_text(str(page), encoding="utf-8")
    dt = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        session, probe = _open(dt, path.as_uri(), 900, 700, mobile=False)
        errors, requests = _problems(dt.events)
        assert errors == [] and requests == [] and probe["csp"] == [], (errors, probe["csp"])
        (drawn,) = probe["charts"]
        assert drawn["drawn"] and drawn["w"] > 200, drawn
        labels = _eval(
            dt, session, "[...document.querySelectorAll('.u-legend th')].map(e => e.textContent)"
        )
        assert "<b>big</b> · train/loss (smoothed)" in labels, labels  # a name stays text
        text = _eval(dt, session, "document.querySelector('.range').textContent")
        assert text == "tokens 0 – 16.38k", text
    finally:
        dt.close()
