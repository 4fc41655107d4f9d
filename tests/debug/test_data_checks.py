"""Data checks: each on a batch that has the fault and on one that does not."""

from __future__ import annotations

import pytest
import torch

from tdiag.debug.data import (
    PADDING_HEAVY_FRAC,
    labels_all_ignored,
    padding_heavy,
    token_out_of_range,
)
from tdiag.debug.registry import SkipCheck
from tdiag.findings import Severity


def ids(b: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (b, length), generator=torch.Generator().manual_seed(1))


def test_token_out_of_range_flags_ids_beyond_the_embedding(tiny_gpt, make_ctx) -> None:
    bad = ids()
    bad[1, 5] = 64
    bad[0, 2] = -1
    (f,) = token_out_of_range(make_ctx(tiny_gpt, bad))
    assert f.severity is Severity.ERROR and f.where == "embed"
    assert f.evidence["n_out_of_range"] == 2 and f.evidence["max_id"] == 64
    assert {(e["row"], e["pos"]) for e in f.evidence["examples"]} == {(0, 2), (1, 5)}
    assert token_out_of_range(make_ctx(tiny_gpt, ids())) == []


def test_token_out_of_range_uses_embedding_rows_not_config(tiny_gpt, make_ctx) -> None:
    # config says 100, the embedding has 64 rows: id 70 still crashes the lookup
    bad = ids()
    bad[0, 0] = 70
    assert token_out_of_range(make_ctx(tiny_gpt, bad, vocab_size=100))


def test_token_out_of_range_checks_labels(tiny_gpt, make_ctx) -> None:
    x = ids()
    labels = x.clone()
    labels[0, :3] = -100  # fine
    ok = make_ctx(tiny_gpt, {"input_ids": x, "labels": labels})
    assert token_out_of_range(ok) == []
    labels[1, 4] = 99
    (f,) = token_out_of_range(make_ctx(tiny_gpt, {"input_ids": x, "labels": labels}))
    assert f.title.startswith("Labels") and f.evidence["n_out_of_range"] == 1


def test_labels_all_ignored(tiny_gpt, make_ctx) -> None:
    x = ids()
    (f,) = labels_all_ignored(
        make_ctx(tiny_gpt, {"input_ids": x, "labels": torch.full_like(x, -100)})
    )
    assert f.severity is Severity.ERROR and f.evidence["n_valid"] == 0
    assert labels_all_ignored(make_ctx(tiny_gpt, {"input_ids": x, "labels": x.clone()})) == []
    # a mask of zeros leaves no derived target either
    zeros = {"input_ids": x, "attention_mask": torch.zeros_like(x)}
    assert labels_all_ignored(make_ctx(tiny_gpt, zeros))[0].severity is Severity.ERROR


def test_labels_one_row_empty_is_info(tiny_gpt, make_ctx) -> None:
    x = ids()
    labels = x.clone()
    labels[1] = -100
    (f,) = labels_all_ignored(make_ctx(tiny_gpt, {"input_ids": x, "labels": labels}))
    assert f.severity is Severity.INFO and f.evidence["rows_without_target"] == 1


def test_labels_skipped_for_random_batch(tiny_gpt, make_ctx) -> None:
    with pytest.raises(SkipCheck):
        labels_all_ignored(make_ctx(tiny_gpt, ids(), batch_from_file=False))


def test_padding_heavy(tiny_gpt, make_ctx) -> None:
    x = ids(4, 16)
    mask = torch.zeros_like(x)
    mask[:, :4] = 1  # 75 % padding
    (f,) = padding_heavy(make_ctx(tiny_gpt, {"input_ids": x, "attention_mask": mask}))
    assert f.severity is Severity.WARNING
    assert f.evidence["pad_fraction"] == pytest.approx(0.75)
    assert f.evidence["pad_fraction"] > PADDING_HEAVY_FRAC
    mask[:, :12] = 1  # 25 %
    assert padding_heavy(make_ctx(tiny_gpt, {"input_ids": x, "attention_mask": mask})) == []


def test_padding_heavy_from_pad_id(tiny_gpt, make_ctx) -> None:
    x = ids(2, 16)
    x[:, 3:] = 0
    assert padding_heavy(make_ctx(tiny_gpt, x, pad_id=0))
    with pytest.raises(SkipCheck):
        padding_heavy(make_ctx(tiny_gpt, x))  # no mask, no pad id
