import json
import math

import pytest

from tdiag.findings import Finding, Severity, count_by_severity, sort_findings, to_jsonable


def test_finding_round_trip_with_nonfinite_evidence():
    f = Finding(
        id="grad.exploding",
        severity="error",
        title="Gradient norm exploding",
        where="blocks.3.mlp.fc",
        step=120,
        evidence={"grad_norm": math.inf, "ratio": math.nan, "steps": (1, 2)},
    )
    assert f.severity is Severity.ERROR
    assert f.docs == "docs/checks.md#grad-exploding"
    text = f.to_json()
    d = json.loads(text)  # strict JSON: no bare NaN/Infinity
    assert d["evidence"]["grad_norm"] == "Infinity"
    back = Finding.from_dict(d)
    assert back.evidence["grad_norm"] == math.inf
    assert math.isnan(back.evidence["ratio"])
    assert back.evidence["steps"] == [1, 2]
    assert back.where == f.where and back.step == 120


@pytest.mark.parametrize(
    "bad", [{"id": "x y", "severity": "error"}, {"id": "a", "severity": "fatal"}]
)
def test_finding_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"id|severity"):
        Finding(title="t", **bad)


def test_from_dict_names_missing_fields():
    with pytest.raises(ValueError, match="missing"):
        Finding.from_dict({"id": "a.b"})


def test_sort_and_count():
    fs = [
        Finding(id="a", severity="info", title="i"),
        Finding(id="b", severity="error", title="e", step=5),
        Finding(id="c", severity="warning", title="w"),
        Finding(id="d", severity="error", title="e", step=1),
    ]
    assert [f.id for f in sort_findings(fs)] == ["d", "b", "c", "a"]
    assert count_by_severity(fs) == {"errors": 2, "warnings": 1, "infos": 1}


def test_to_jsonable_handles_tensors_and_numpy():
    import numpy as np
    import torch

    assert to_jsonable({"a": torch.tensor(2.5), "b": np.float32(1.5), "c": float("-inf")}) == {
        "a": 2.5,
        "b": 1.5,
        "c": "-Infinity",
    }
