"""Read events.jsonl: the Findings the Monitor raised while training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tdiag.history.columns import BLANK, NONFINITE, utf8
from tdiag.history.format import EVENTS_FILE

__all__ = ["read_events"]


def _parse_constant(token: str) -> float:
    return NONFINITE[token]


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read events.jsonl (Findings raised live), up to its size at open. Lines that are not
    UTF-8 JSON objects are skipped; a missing file gives []."""
    from tdiag.findings import from_jsonable

    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        data = fh.read(os.fstat(fh.fileno()).st_size)
    out = []
    for raw in data.split(b"\n"):
        line = utf8(raw)
        if line is None or not line.strip(BLANK):
            continue
        try:
            obj = from_jsonable(json.loads(line, parse_constant=_parse_constant))
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out
