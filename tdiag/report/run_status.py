"""How the run ended, in words, for the top of the report (Contract 4: ``summary.run_status``).

From meta.json's ``end`` block (written by the Monitor when it closes) and, when there is
none, from the run folder's lock (tdiag/runlock.py): a live process holding it means the run
is still going; no end entry and no holder means it ended without closing — killed
(``kill -9``, the OOM killer, a node lost) or crashed before the Monitor could close.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdiag.runlock import lock_holder

__all__ = ["run_status"]


def run_status(
    meta: Mapping[str, Any] | None, folder: Path, last_step: int | None
) -> dict[str, Any] | None:
    """``{"state", "text", "step"}``; ``state`` is ``completed | terminated | failed |
    running | ended-without-closing``. None for a bare history without meta.json."""
    if not meta:
        return None
    end = meta.get("end")
    if isinstance(end, Mapping):
        step = end.get("steps", last_step)
        status = end.get("status")
        if status == "signal":
            sig = end.get("signal") or "a signal"
            return {
                "state": "terminated",
                "step": step,
                "text": f"Terminated by {sig} at step {step}.",
            }
        if status == "exception":
            what = end.get("exception") or "an exception"
            return {"state": "failed", "step": step, "text": f"Failed with {what} at step {step}."}
        text = f"Completed after step {step}."
        if status == "nonfinite":
            text = f"Completed after step {step} (non-finite values were raised, see the findings)."
        return {"state": "completed", "step": step, "text": text}
    holder = lock_holder(folder)
    if holder is not None:
        pid = holder.get("pid")
        who = f"process {pid}" if pid else "a process"
        return {
            "state": "running",
            "step": last_step,
            "text": f"Still running ({who} holds the run folder); step {last_step} so far.",
        }
    return {
        "state": "ended-without-closing",
        "step": last_step,
        "text": (
            f"Ended without closing (crashed or killed) after step {last_step}: meta.json has "
            "no end entry and no process holds the run folder."
        ),
    }
