"""Every Finding id that tdiag can emit is documented in docs/checks.md.

Each debugger check id (tdiag.debug.registry.CHECKS) and each report rule id
(tdiag.report.rules.registry.RULES) needs the anchor its Finding.docs link points to:
``<a id="{id with '.' replaced by '-'}">``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tdiag.findings import Finding, Severity

DOCS = Path(__file__).parents[1] / "docs" / "checks.md"


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"', DOCS.read_text(encoding="utf-8")))


def _check_ids() -> list[str]:
    from tdiag.debug import CHECKS  # importing the package registers every family

    return list(CHECKS)


def _rule_ids() -> list[str]:
    import tdiag.report.rules  # noqa: F401  (importing registers the rules)
    from tdiag.report.rules.registry import RULES

    return list(RULES)


def test_registries_are_not_empty() -> None:
    # a registry that failed to import its families would make the tests below vacuous
    assert len(_check_ids()) >= 20
    assert len(_rule_ids()) >= 5


def _live_ids() -> list[str]:
    """Ids the Monitor raises live (tdiag/monitor/alerts.py builds them as literals)."""
    text = (Path(__file__).parents[1] / "tdiag" / "monitor" / "alerts.py").read_text()
    return sorted(set(re.findall(r'id="([a-z]+\.[a-z0-9-]+)"', text)))


def _loop_ids() -> list[str]:
    from tdiag.monitor.loopchecks import LOOP_CHECKS

    return list(LOOP_CHECKS)


@pytest.mark.parametrize("source", ["check", "rule", "live", "loop"])
def test_every_id_has_its_anchor(source: str) -> None:
    ids = {"check": _check_ids, "rule": _rule_ids, "live": _live_ids, "loop": _loop_ids}[source]()
    assert ids
    anchors = _anchors()
    missing = [i for i in ids if i.replace(".", "-") not in anchors]
    assert not missing, f"docs/checks.md lacks <a id=...> anchors for {missing}"


def test_finding_docs_link_matches_the_anchor() -> None:
    anchors = _anchors()
    for fid in _check_ids() + _rule_ids():
        docs = Finding(id=fid, severity=Severity.INFO, title="t", message="m").docs
        path, _, anchor = docs.partition("#")
        assert path == "docs/checks.md" and anchor in anchors, (fid, docs)
