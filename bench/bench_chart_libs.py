"""Charting libraries for the report, compared in headless Chromium: page weight, load time
and rendering time of one chart of 50 series x 2,000 points, and CSP violations under the
report's strict policy (scripts by hash only, no 'unsafe-inline', no 'unsafe-eval').

uPlot is vendored (tdiag/report/assets/). The others are only fetched for this comparison,
once, with npm into a folder given by ``--libs``::

    mkdir -p /tmp/libs && cd /tmp/libs
    for p in plotly.js-dist-min @bokeh/bokehjs vega vega-lite vega-embed; do
        npm pack $p && d=$(ls -t *.tgz | head -1) && mkdir -p ${d%.tgz} && tar xzf $d -C ${d%.tgz}
    done
    cd - && .venv/bin/python bench/bench_chart_libs.py --libs /tmp/libs

Each page inlines its library and the data (JSON), draws, and records ``performance.now()``
when the chart is on screen (after the next animation frame); each library is loaded
``--repeats`` times in a fresh tab and the median is reported.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "report"))

from test_browser import CHROMIUM, DevTools  # noqa: E402  (the test's DevTools client)

_DRAW = {
    "uplot": """
const d = JSON.parse(document.getElementById('data').textContent);
const series = [{}].concat(d.ys.map((_, i) => ({label: 's' + i, stroke: 'hsl(' + (i * 37) % 360 + ',60%,45%)'})));
const t1 = performance.now();
new uPlot({width: 900, height: 400, series}, [d.x].concat(d.ys), document.getElementById('c'));
done(t1);
""",
    "plotly": """
const d = JSON.parse(document.getElementById('data').textContent);
const t1 = performance.now();
Plotly.newPlot('c', d.ys.map((y, i) => ({x: d.x, y, type: 'scatter', mode: 'lines', name: 's' + i})),
  {width: 900, height: 400}).then(() => done(t1));
""",
    "bokeh": """
const d = JSON.parse(document.getElementById('data').textContent);
const t1 = performance.now();
const p = Bokeh.Plotting.figure({width: 900, height: 400, output_backend: 'canvas'});
d.ys.forEach((y, i) => p.line(d.x, y, {line_color: 'hsl(' + (i * 37) % 360 + ',60%,45%)'}));
Bokeh.Plotting.show(p, document.getElementById('c')).then(() => done(t1));
""",
    "vega-lite": """
const d = JSON.parse(document.getElementById('data').textContent);
const values = [];
d.ys.forEach((y, i) => y.forEach((v, j) => values.push({x: d.x[j], y: v, s: 's' + i})));
const t1 = performance.now();
vegaEmbed('#c', {width: 900, height: 400, data: {values}, mark: 'line',
  encoding: {x: {field: 'x', type: 'quantitative'}, y: {field: 'y', type: 'quantitative'},
             color: {field: 's', type: 'nominal'}}}, {renderer: 'canvas', actions: false})
  .then(() => done(t1), e => { window.__done = {error: String(e)}; });
""",
}
_FILES = {
    "uplot": [ROOT / "tdiag/report/assets/uPlot.iife.min.js"],
    "plotly": ["plotly.js-dist-min-*/package/plotly.min.js"],
    "bokeh": [
        "bokeh-bokehjs-*/package/build/js/bokeh.min.js",
        "bokeh-bokehjs-*/package/build/js/bokeh-api.min.js",
    ],
    "vega-lite": [
        "vega-[0-9]*/package/build/vega.min.js",
        "vega-lite-*/package/build/vega-lite.min.js",
        "vega-embed-*/package/build/vega-embed.min.js",
    ],
}
_CSS = {"uplot": [ROOT / "tdiag/report/assets/uPlot.min.css"]}
_DONE = """function done(t1) { requestAnimationFrame(() => setTimeout(() => {
  window.__done = {draw_ms: performance.now() - t1, total_ms: performance.now()}; }, 0)); }"""
_LISTEN = """window.__csp = []; document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective));
window.addEventListener('error', e => {  // a ResizeObserver loop note is not a failure
  if (!/ResizeObserver/.test(e.message)) window.__done = {error: String(e.message)}; });
window.addEventListener('unhandledrejection', e => { window.__done = {error: String(e.reason)}; });"""


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _resolve(libs: Path, pattern: str | Path) -> Path:
    if isinstance(pattern, Path):
        return pattern
    found = sorted(libs.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{pattern} under {libs} (see the npm commands in --help)")
    return found[-1]


def make_page(lib: str, libs: Path, n_series: int, n_points: int) -> str:
    x = list(range(n_points))
    ys = [
        [round(math.sin(j / 50 + i) + 0.1 * math.sin(j * 1.7 + i) + i * 0.05, 4) for j in x]
        for i in range(n_series)
    ]
    data = json.dumps({"x": x, "ys": ys})
    scripts = [_resolve(libs, p).read_text(encoding="utf-8") for p in _FILES[lib]]
    scripts.append(_DONE + _DRAW[lib])
    css = "".join(p.read_text(encoding="utf-8") for p in _CSS.get(lib, []))
    csp = (
        f"default-src 'none'; script-src {' '.join(_sha(s) for s in scripts)}; "
        f"style-src {_sha(css)}; img-src data: blob:"
    )
    body = "".join(f"<script>{s}</script>" for s in scripts)
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}"><style>{css}</style>'
        f'</head><body><div id="c"></div><script type="application/json" id="data">{data}'
        f"</script>{body}</body></html>"
    )


def measure(dt: DevTools, url: str, timeout: float = 60.0) -> dict:
    target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    dt.send("Page.enable", session=session)
    dt.send("Page.addScriptToEvaluateOnNewDocument", {"source": _LISTEN}, session=session)
    dt.send("Page.navigate", {"url": url}, session=session)
    deadline = time.monotonic() + timeout
    result: dict = {}
    while time.monotonic() < deadline:
        got = dt.send(
            "Runtime.evaluate",
            {"expression": "JSON.stringify([window.__done || null, window.__csp || []])",
             "returnByValue": True},
            session=session,
        )["result"].get("value")  # fmt: skip
        done, csp = json.loads(got) if got else (None, [])
        if done:
            result = {**done, "csp": sorted(set(csp))}
            break
        time.sleep(0.05)
    else:
        result = {"error": "timeout", "csp": []}
    dt.send("Target.closeTarget", {"targetId": target})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--libs", type=Path, default=Path("/tmp/libs"))
    parser.add_argument("--only", default="uplot,plotly,bokeh,vega-lite")
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        print("headless Chromium not found (apt-get install chromium)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="tdiag-chart-libs-"))
    dt = DevTools(CHROMIUM, work / "profile")
    rows = []
    try:
        print(f"{'library':>10} {'page KiB':>8} {'lib KiB':>8} {'load ms':>8} {'draw ms':>8}  CSP")
        for lib in args.only.split(","):
            try:
                page = make_page(lib, args.libs, args.series, args.points)
            except FileNotFoundError as exc:
                print(f"{lib:>10} skipped: {exc}")
                continue
            path = work / f"{lib}.html"
            path.write_text(page, encoding="utf-8")
            lib_bytes = sum(_resolve(args.libs, p).stat().st_size for p in _FILES[lib])
            runs = [measure(dt, path.as_uri()) for _ in range(args.repeats)]
            ok = [r for r in runs if "error" not in r]
            row = {
                "library": lib,
                "page_kib": path.stat().st_size / 1024,
                "lib_kib": lib_bytes / 1024,
                "load_ms": statistics.median(r["total_ms"] for r in ok) if ok else None,
                "draw_ms": statistics.median(r["draw_ms"] for r in ok) if ok else None,
                "csp": sorted({v for r in runs for v in r["csp"]}),
                "errors": [r["error"] for r in runs if "error" in r],
            }
            rows.append(row)
            fmt = lambda v: f"{v:8.0f}" if v is not None else f"{'—':>8}"  # noqa: E731
            print(
                f"{lib:>10} {row['page_kib']:>8.0f} {row['lib_kib']:>8.0f} {fmt(row['load_ms'])} "
                f"{fmt(row['draw_ms'])}  {', '.join(row['csp']) or 'none'}"
                + (f"  errors: {row['errors'][0][:80]}" if row["errors"] else "")
            )
    finally:
        dt.close()
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
