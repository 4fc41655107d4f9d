"""The script and style blocks a chart page inlines, and the Content-Security-Policy that
allows exactly them (by SHA-256 hash): no network, no eval, no inline event handlers.

The files ship in the package (``tdiag/report/assets/``): uPlot's minified build and CSS
(MIT, vendored from npm, licence beside it) and tdiag's own ``charts.js``/``charts.css``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from markupsafe import Markup

__all__ = ["PageAssets", "page_assets"]

_SCRIPTS = ("uPlot.iife.min.js", "charts.js")
_STYLES = ("uPlot.min.css", "charts.css")


@dataclass(frozen=True)
class PageAssets:
    """What a page with charts puts in its ``<head>`` (style, csp) and at the end of its
    ``<body>`` (scripts).

    Attributes:
        style: one ``<style>`` block (uPlot's CSS, the charts' CSS, then ``extra_css``).
        scripts: the ``<script>`` blocks (uPlot, then tdiag's chart code).
        csp: the ``content`` of the page's ``<meta http-equiv="Content-Security-Policy">``.
        script_hashes: the CSP source expressions of the scripts (``'sha256-…'``).
        style_hashes: the CSP source expression of the style block.
    """

    style: Markup
    scripts: Markup
    csp: str
    script_hashes: tuple[str, ...]
    style_hashes: tuple[str, ...]


@functools.cache
def _read(name: str) -> str:
    text = resources.files("tdiag.report").joinpath("assets", name).read_text(encoding="utf-8")
    # "</script", "</style" or "<!--" inside would end the element early (or change how
    # the HTML parser reads it); the vendored files have none (checked, so that an upgrade
    # that adds one fails loudly rather than breaking the page).
    lower = text.lower()
    if "</script" in lower or "</style" in lower or "<!--" in lower:
        raise ValueError(f"asset {name} contains a closing script/style tag or '<!--'")
    return text


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@functools.cache
def _page_assets(extra_css: str) -> PageAssets:
    css = "\n".join(_read(n) for n in _STYLES) + ("\n" + extra_css if extra_css else "")
    if "</style" in css.lower():
        raise ValueError("extra_css contains a closing style tag")
    scripts = [_read(n) for n in _SCRIPTS]
    script_hashes = tuple(_hash(s) for s in scripts)
    style_hashes = (_hash(css),)
    csp = (
        "default-src 'none'; "
        f"script-src {' '.join(script_hashes)}; "
        f"style-src {' '.join(style_hashes)}; "
        "img-src data:"
    )
    return PageAssets(
        style=Markup("<style>" + css + "</style>"),
        scripts=Markup("".join(f"<script>{s}</script>" for s in scripts)),
        csp=csp,
        script_hashes=script_hashes,
        style_hashes=style_hashes,
    )


def page_assets(extra_css: str = "") -> PageAssets:
    """The inline blocks and CSP of a page that draws :class:`~tdiag.report.charts.Chart`\\ s.

    Args:
        extra_css: the page's own CSS, appended to the style block (so one hash covers it;
            the page then needs no other ``<style>`` and no ``style=`` attributes — element
            styles set from script through the CSSOM, as uPlot does, are not blocked).

    Returns:
        A :class:`PageAssets`; put ``csp`` in the page's CSP meta tag, ``style`` in its head
        and ``scripts`` after :func:`~tdiag.report.charts.chart_data_script` in its body.
    """
    return _page_assets(extra_css)
