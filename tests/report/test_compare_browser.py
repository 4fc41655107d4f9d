"""compare.html in headless Chromium: every chart drawn, no CSP violation, no request, no
script error, no horizontal scroll at desktop and phone width, hostile run names inert
(nothing they carry runs). Uses the DevTools client of ``test_browser.py``; skipped
without Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_browser import CHROMIUM, DevTools, _eval, _open, _problems

from tdiag.history import HistoryWriter
from tdiag.report.compare_page import build_compare

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed"),
]

FIXTURES = Path(__file__).parent / "fixtures"
EVIL = '<img src=x onerror="window.__pwned=1">'


def _hostile(folder: Path, lr: float) -> None:
    with HistoryWriter(folder / "history.jsonl") as w:
        for step in range(1, 61):
            w.write({"step": step, "train/loss": 4.0 / step**0.4 + lr, "perf/tokens_per_sec": 1e4})
    meta = {"name": EVIL + folder.name, "config": {"lr": lr, "note": EVIL}}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_compare_page_opens_cleanly_in_chromium(tmp_path):
    for name in ("compare_seed0", "compare_lr_jump", "compare_seed1"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    _hostile(tmp_path / "evil_a", 0.0)
    _hostile(tmp_path / "evil_b", 0.5)
    build_compare(
        [tmp_path / n for n in ("compare_seed0", "compare_lr_jump", "compare_seed1")],
        tmp_path / "cmp",
    )
    build_compare([tmp_path / "evil_a", tmp_path / "evil_b"], tmp_path / "evil")
    dt = DevTools(CHROMIUM, tmp_path / "profile")
    shots = []
    try:
        for page_dir, width, mobile in (("cmp", 1280, False), ("cmp", 390, True),
                                        ("evil", 1280, False)):  # fmt: skip
            url = (tmp_path / page_dir / "compare.html").resolve().as_uri()
            session, page = _open(dt, url, width, 900, mobile=mobile)
            errors, requests = _problems(dt.events)
            assert errors == [] and requests == [], (errors, requests)
            assert page["csp"] == [] and _eval(dt, session, "window.__csp") == []
            assert page["title"].startswith("tdiag compare")
            assert page["charts"], page
            for chart in page["charts"]:
                assert chart["drawn"] and chart["w"] > 100 and chart["h"] > 80, chart
            assert page["scrollWidth"] <= page["clientWidth"] + 1, page["wide"]
            assert _eval(dt, session, "window.__pwned === undefined")
            shot = tmp_path / f"compare-{page_dir}-{width}.png"
            data = dt.send("Page.captureScreenshot", {"captureBeyondViewport": True},
                           session=session)["data"]  # fmt: skip
            import base64

            shot.write_bytes(base64.b64decode(data))
            shots.append(shot)
        ids = _eval(dt, session, "[...document.querySelectorAll('figure.chart')].map(f => f.id)")
        assert "chart-loss" in ids
    finally:
        dt.close()
    if os.environ.get("TDIAG_SCREENSHOTS"):
        out = Path(os.environ["TDIAG_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, out / shot.name)
