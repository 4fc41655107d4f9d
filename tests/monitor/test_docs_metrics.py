"""Every metric name the Monitor writes is documented in docs/metrics.md."""

from __future__ import annotations

from pathlib import Path

import torch

from tdiag import Monitor

from .conftest import ListSink, quiet_options, train_loop

DOCS = Path(__file__).parents[2] / "docs" / "metrics.md"
PER_LAYER = ("act_rms/", "grad_norm/", "attn/entropy/", "attn/max_logit/", "train/lr/")


def _doc_name(metric: str) -> str:
    """``grad_norm/blocks.0.mlp`` -> ``grad_norm/<``: per-layer names are documented once."""
    for prefix in PER_LAYER:
        if metric.startswith(prefix):
            return prefix + "<"
    return metric


def test_every_emitted_metric_is_documented(tmp_path, tiny_gpt):
    sink = ListSink()
    opts = quiet_options(tmp_path, log_every=2, watch="layers", system=True)
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3)
    with Monitor(tiny_gpt, opt, sinks=[sink], config={"grad_clip": 1.0}, **opts) as mon:
        train_loop(tiny_gpt, mon, 4, opt=opt, clip=1.0)
        mon.log({"val/loss": 3.0})
    emitted = {k for _, row in sink.rows for k in row}
    assert {"train/loss", "train/grad_norm", "sys/rss_gb", "val/loss"} <= emitted
    assert {"train/skipped_steps", "train/update_ratio", "train/lr"} <= emitted
    assert any(m.startswith("act_rms/") for m in emitted)  # the per-layer names are in
    text = DOCS.read_text(encoding="utf-8")
    missing = sorted({_doc_name(m) for m in emitted if f"`{_doc_name(m)}" not in text})
    assert not missing, f"docs/metrics.md does not document {missing}"
