"""Headline numbers that say what they are, so that they agree with what the trainer and the
Monitor print: the final train loss is an interval mean (with the last step beside it), the
wall time is the Monitor's start to end, an MFU against a measured matmul is labelled so, and
logged NaN values are data, not a problem reading the history."""

from __future__ import annotations

import json

import pandas as pd

from tdiag.report import build_report
from tdiag.report.summary import headline_cards, summarize


def _df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": [10, 20, 30],
            "time": [100.0, 105.0, 110.0],
            "train/loss": [2.0, 1.5, 1.424],
            "train/loss_last": [1.9, 1.45, 1.369],
            "perf/mfu": [0.9, 0.98, 0.97],
        }
    )


def _card(cards: list[dict[str, str]], label: str) -> dict[str, str]:
    return next(c for c in cards if c["label"] == label)


def test_final_train_loss_says_it_is_the_last_intervals_mean_and_gives_the_last_step() -> None:
    s = summarize(_df(), {})
    assert s["final_train_loss"] == 1.424 and s["final_train_loss_last"] == 1.369
    assert s["final_train_loss_from_step"] == 21
    card = _card(headline_cards(s), "Final train loss")
    assert card["value"] == "1.424"
    assert card["sub"] == "mean of steps 21–30; last step alone 1.369"


def test_final_train_loss_without_loss_last_still_names_the_interval() -> None:
    s = summarize(_df().drop(columns=["train/loss_last"]), None)
    assert s["final_train_loss_last"] is None
    assert _card(headline_cards(s), "Final train loss")["sub"] == "mean of steps 21–30"


def test_wall_time_is_the_monitors_start_to_end_when_meta_has_it() -> None:
    meta = {"start_time": 95.0, "end": {"time": 112.5}}
    s = summarize(_df(), meta)
    assert s["run_time_s"] == 17.5 and s["wall_time_s"] == 10.0
    card = _card(headline_cards(s), "Wall time")
    assert card["value"] == "17.5 s"
    assert card["sub"] == "Monitor start to end; logged rows span 10.0 s"
    bare = _card(headline_cards(summarize(_df(), None)), "Wall time")  # a history alone
    assert bare["value"] == "10.0 s" and bare["sub"] == "first to last logged row"


def test_mfu_against_a_measured_matmul_is_not_called_mfu() -> None:
    measured = {"perf": {"peak_source": "measured: fp32 1024x1024 matmul, best of 7"}}
    cards = headline_cards(summarize(_df(), measured))
    assert "MFU" not in [c["label"] for c in cards]
    card = _card(cards, "vs measured matmul peak")
    assert card["value"] == "95.0 %" and "not MFU" in card["sub"]
    table = {"perf": {"peak_source": "table: H100 SXM bf16 dense"}}
    assert _card(headline_cards(summarize(_df(), table)), "MFU")["value"] == "95.0 %"


def test_logged_nan_is_data_in_the_summary_not_a_history_problem(tmp_path) -> None:
    rows = [{"step": s, "time": 100.0 + s, "train/loss": 2.0 - s / 100} for s in range(1, 41)]
    rows[20]["train/loss"] = "NaN"
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_report(tmp_path)
    assert report["summary"]["nonfinite_values"] == 1
    assert report["history_problems"] == []
    card = _card(headline_cards(report["summary"]), "NaN/Inf logged")
    assert card["value"] == "1"
    html = (tmp_path / "report.html").read_text()
    assert "NaN/Inf logged" in html
    # the finding's docs link is a source-tree path: the page also says what resolves anywhere
    assert "<code>tdiag explain train.nonfinite-loss</code>" in html


def test_a_run_without_gpu_memory_has_no_gpu_memory_card():
    from tdiag.report.summary import headline_cards

    base = {"steps": 10, "peak_rss_gb": 0.5}
    labels = [c["label"] for c in headline_cards({**base, "peak_gpu_mem_gb": None})]
    assert "Peak GPU memory" not in labels and "Peak process RSS" in labels
    cards = headline_cards({**base, "peak_gpu_mem_gb": 12.0})
    assert any(c["label"] == "Peak GPU memory" and "12" in c["value"] for c in cards)
