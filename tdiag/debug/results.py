"""What a check run produced: one :class:`CheckResult` per check, gathered in a
:class:`CheckRun`, and the JSON objects of ``tdiag check --json`` (Contract 2).

Torch-free: ``tdiag check`` builds these in the parent process from what the check process
sends (see :mod:`tdiag.debug.worker`), and renders them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tdiag.debug.usercode import DeadlineExceeded, LoadError
from tdiag.findings import Finding, count_by_severity, sort_findings

__all__ = ["NOT_RUN_REASON", "STATUSES", "CheckResult", "CheckRun", "error_json"]

STATUSES = ("pass", "fail", "skipped", "error")

#: Reason of the checks left out when ``--timeout`` was reached before they started.
NOT_RUN_REASON = "not run: --timeout reached"


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        id: the check id.
        status: "pass" (no warning/error finding), "fail" (at least one), "skipped" (did not
            apply; ``message`` says why) or "error" (the check itself raised; ``message``).
        seconds: wall time of the check.
        findings: what it found (info findings do not make it fail).
        message: reason for skipped/error, else "".
    """

    id: str
    status: str
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    message: str = ""


@dataclass
class CheckRun:
    """All results of one run, in the order the checks ran.

    Attributes:
        results: one per selected check.
        seconds: wall time of the run.
        meta: model and batch description.
        timed_out: the :class:`DeadlineExceeded` that stopped the run (``--timeout`` reached
            while ``timed_out_check`` was running), else None. The run is then incomplete.
        timed_out_check: the id of the check that was running at the deadline.
        error: why the run is incomplete, when it is: ``--timeout`` reached, or the model
            file ended or crashed the check process, during the checks (``LoadError.cause``
            says which); ``tdiag check`` exits 2 then. None for a complete run.
    """

    results: list[CheckResult]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    timed_out: DeadlineExceeded | None = None
    timed_out_check: str | None = None
    error: LoadError | None = None

    @property
    def findings(self) -> list[Finding]:
        """Every finding, worst first."""
        return sort_findings(f for r in self.results for f in r.findings)

    @property
    def summary(self) -> dict[str, int]:
        return count_by_severity(self.findings)

    def to_json(self, target: str) -> dict[str, Any]:
        """Contract 2's object for ``tdiag check --json``."""
        from tdiag import __version__

        out: dict[str, Any] = {
            "tdiag_version": __version__,
            "target": target,
            "summary": self.summary,
            "checks": [
                {"id": r.id, "status": r.status, "seconds": round(r.seconds, 4)}
                # an extra key (the contract allows additions): why skipped / errored
                | ({"reason": r.message} if r.message else {})
                for r in self.results
            ],
            "findings": [f.to_dict() for f in self.findings],
        }
        if self.timed_out is not None:  # extra key, only on an incomplete run (exit code 2)
            out["timed_out"] = {"check": self.timed_out_check, "seconds": self.timed_out.seconds}
        if self.error is not None:  # extra key, only on an incomplete run (exit code 2)
            out["error"] = _error_dict(self.error)
        return out


def _error_dict(exc: LoadError) -> dict[str, str]:
    return {"cause": exc.cause, "message": exc.message, "traceback": exc.user_traceback}


def error_json(target: str, exc: LoadError) -> dict[str, Any]:
    """The one object ``tdiag check --json`` prints when the file could not be loaded or run
    (exit code 2): ``{"tdiag_version", "target", "error": {"cause", "message",
    "traceback"}}``. No ``summary``/``checks``/``findings``: nothing was checked, and a
    reader that expects them fails loudly instead of reading "no errors"."""
    from tdiag import __version__

    return {"tdiag_version": __version__, "target": target, "error": _error_dict(exc)}
