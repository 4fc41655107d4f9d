"""Byte tokenizer, corpus loading and split, the two batching modes, padding fraction."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from reference_model.data import (
    ByteTokenizer,
    ChunkBatcher,
    DocumentBatcher,
    load_corpus,
    pad_batch,
    padding_fraction,
    split_documents,
    token_stream,
)


def test_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # héllo ✓"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256
    assert tok.decode(ids) == text
    assert tok.decode([*ids.tolist(), tok.pad_id, tok.pad_id]) == text  # padding dropped


def test_builtin_corpus_is_deterministic_fast_and_split() -> None:
    t0 = time.perf_counter()
    a = load_corpus(max_bytes=500_000)
    elapsed = time.perf_counter() - t0
    b = load_corpus(max_bytes=500_000)
    assert elapsed < 2.0
    assert a.train == b.train and a.val == b.val
    assert a.n_bytes == 500_000
    assert len(a.train) > len(a.val) > 0
    assert not set(a.train) & set(a.val)
    assert b"def " in b"".join(a.train)


def test_user_folder_and_file(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    c = load_corpus(tmp_path, val_fraction=0.2)
    assert len(c.train) + len(c.val) == 30
    assert all(b"\0" not in d for d in c.train + c.val)
    single = load_corpus(tmp_path / "doc00.txt", val_fraction=0.25)
    assert len(single.train[0]) + len(single.val[0]) == len((tmp_path / "doc00.txt").read_bytes())
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")


def _docs() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (400,), generator=g).tolist()
    return [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]


def test_chunk_batches_are_deterministic_and_sharded() -> None:
    stream = torch.arange(10_000) % 256
    one = ChunkBatcher(stream.to(torch.uint8), batch_size=8, seq_len=16, seed=3)
    r0 = ChunkBatcher(
        stream.to(torch.uint8), batch_size=4, seq_len=16, seed=3, rank=0, world_size=2
    )
    r1 = ChunkBatcher(
        stream.to(torch.uint8), batch_size=4, seq_len=16, seed=3, rank=1, world_size=2
    )
    for i in range(3):
        full = one.batch(i)["input_ids"]
        assert full.shape == (8, 16)
        assert torch.equal(full, one.batch(i)["input_ids"])  # a pure function of the index
        # two ranks together see exactly the single-process batch, without overlap
        assert torch.equal(torch.cat([r0.batch(i)["input_ids"], r1.batch(i)["input_ids"]]), full)
    # next epoch: reshuffled
    assert not torch.equal(one.batch(0)["input_ids"], one.batch(len(one))["input_ids"])


def test_pad_batch_and_padding_fraction() -> None:
    batch = pad_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_id=256)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert padding_fraction(batch) == pytest.approx(2 / 6)
    assert padding_fraction({"input_ids": batch["input_ids"]}) == 0.0


def test_documents_truncated_and_bucketing_reduces_padding() -> None:
    docs = _docs()
    plain = DocumentBatcher(docs, batch_size=16, max_seq_len=64, bucket=False, seed=1)
    bucketed = DocumentBatcher(docs, batch_size=16, max_seq_len=64, bucket=True, seed=1)
    n = len(plain)
    pad_plain = sum(padding_fraction(plain.batch(i)) for i in range(n)) / n
    pad_bucket = sum(padding_fraction(bucketed.batch(i)) for i in range(n)) / n
    assert pad_bucket < 0.5 * pad_plain
    for i in range(n):
        assert bucketed.batch(i)["input_ids"].shape[1] <= 64  # truncation at max_seq_len
    # every document appears once per epoch with bucketing too
    seen = sorted(
        tuple(row[m.bool()].tolist())
        for i in range(n)
        for row, m in zip(
            bucketed.batch(i)["input_ids"], bucketed.batch(i)["attention_mask"], strict=True
        )
    )
    assert len(seen) == n * 16
    assert len(set(seen)) <= len(docs)


def test_split_documents_and_stream() -> None:
    docs = split_documents([b"first paragraph here\n\nsecond one, also long\n\n\n\nx"], min_len=5)
    assert docs == [b"first paragraph here", b"second one, also long"]
    assert token_stream([b"ab", b"c"]).tolist() == [97, 98, 10, 99]
