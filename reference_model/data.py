"""Data for the reference Transformer: a byte tokenizer, a built-in corpus, two batching modes.

- Tokenizer: UTF-8 bytes (ids 0..255) plus a pad id (256). No download.
- Built-in corpus: the source files of Python's standard library (always on disk), read in a
  deterministic order up to a byte cap, split into train / validation by a hash of each
  file's path. Any text file or folder works too.
- Batching, as a practitioner chooses:
  * ``ChunkBatcher``: fixed-length chunks of one token stream (language-model pre-training);
  * ``DocumentBatcher``: variable-length documents (paragraphs separated by blank lines),
    truncated at ``max_seq_len``, grouped by a length-bucketing sampler and padded per
    batch with an attention mask. ``padding_fraction(batch)`` reports what padding costs.
Every batch is a deterministic function of (seed, batch index, rank), so a resumed run sees
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import PAD_ID

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_MAX_BYTES = 3_000_000


class DataError(ValueError):
    """The corpus cannot be used: a missing path, no text, too little text for a batch."""


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


# --------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 256 is padding."""

    vocab_size = 257
    pad_id = PAD_ID

    def encode(self, text: str | bytes) -> Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return bytes(v for v in values if 0 <= v < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """Documents (raw bytes) of the train and validation splits."""

    train: list[bytes]
    val: list[bytes]
    source: str

    @property
    def n_bytes(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.val))


def _is_val(key: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return h / 2**32 < val_fraction


def _text_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if suffixes is None or name.endswith(suffixes):
                files.append(Path(dirpath) / name)
    return files


def load_corpus(
    path: str | Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.1
) -> Corpus:
    """Load a text corpus; None = the Python standard library's source files.

    A folder: every text file in it (binary files, those with NUL bytes, are skipped), sorted,
    each cut at max_bytes / 64 bytes, split by a hash of the relative path. A single file: its last ``val_fraction`` of bytes is
    the validation split. At most ``max_bytes`` are read.

    Raises:
        DataError: the path does not exist, or holds no text (or too little to split).
        ValueError: val_fraction is not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if path is None:
        root, suffixes = Path(sysconfig.get_paths()["stdlib"]), (".py",)
        source = f"python-stdlib:{root}"
    else:
        root, suffixes, source = Path(path), None, str(path)
        if not root.exists():
            raise DataError(f"corpus path does not exist: {str(path)!r}")
    if root.is_file():
        data = root.read_bytes()[:max_bytes]
        cut = int(len(data) * (1 - val_fraction))
        if cut == 0 or cut == len(data):
            raise DataError(f"corpus file is too small to split: {str(path)!r}")
        return Corpus(train=[data[:cut]], val=[data[cut:]], source=source)
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    per_file = max(max_bytes // 64, 4096)  # many files, not the first few long ones
    for f in _text_files(root, suffixes):
        if total >= max_bytes:
            break
        try:
            data = f.read_bytes()[: min(per_file, max_bytes - total)]
        except OSError as e:
            logger.debug("skipping unreadable %s: %s", f, e)
            continue
        if not data or b"\0" in data:
            continue
        total += len(data)
        (val if _is_val(f.relative_to(root).as_posix(), val_fraction) else train).append(data)
    if val == [] and len(train) > 1:  # unlucky hashes: still validate on something
        val.append(train.pop())
    if not train or not val:
        raise DataError(f"no text (or too little to split) under {str(root)!r}")
    return Corpus(train=train, val=val, source=source)


def split_documents(docs: Sequence[bytes], *, min_len: int = 16) -> list[bytes]:
    """Documents for the padded mode: paragraphs, i.e. text separated by blank lines."""
    out = []
    for doc in docs:
        for part in doc.split(b"\n\n"):
            part = part.strip(b"\n")
            if len(part) >= min_len:
                out.append(part)
    return out


def token_stream(docs: Sequence[bytes]) -> Tensor:
    """All documents joined by a newline, as one uint8 tensor of byte ids (N,)."""
    return torch.frombuffer(bytearray(b"\n".join(docs)), dtype=torch.uint8)


# --------------------------------------------------------------------------- batching


def padding_fraction(batch: dict[str, Tensor]) -> float:
    """Fraction of the positions of a batch that are padding (0.0 without a mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return 0.0
    return float(1.0 - mask.float().mean())  # batches live on the host: no device sync


def pad_batch(seqs: Sequence[Tensor], *, pad_id: int = PAD_ID) -> dict[str, Tensor]:
    """Right-pad 1-D id tensors to the longest: input_ids, attention_mask, labels (-100 at pads)."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _epoch_perm(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ChunkBatcher:
    """Fixed-length, non-overlapping chunks of a token stream, shuffled per epoch.

    Batch ``i`` (a global micro-batch counter) on rank r of w holds the chunks at positions
    ``((i * w + r) * B) ...`` of the epoch's permutation: ranks never share a chunk
    (DistributedSampler-like sharding) and batch i is the same whatever happened before.
    """

    def __init__(
        self,
        tokens: Tensor,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0 or seq_len <= 1:
            raise ValueError(
                f"need batch_size > 0 and seq_len > 1, got {batch_size!r}, {seq_len!r}"
            )
        self.n_chunks = len(tokens) // seq_len
        per_step = batch_size * world_size
        if self.n_chunks < per_step:
            raise DataError(
                f"corpus too small: {len(tokens)} tokens make {self.n_chunks} chunks of {seq_len}, "
                f"need at least {per_step}"
            )
        self.tokens = tokens[: self.n_chunks * seq_len].view(self.n_chunks, seq_len)  # (N, L)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = self.n_chunks // per_step
        self._perm_cache: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _perm(self, epoch: int) -> Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = (
                _epoch_perm(self.n_chunks, self.seed, epoch)
                if self.shuffle
                else torch.arange(self.n_chunks)
            )
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def batch(self, index: int) -> dict[str, Tensor]:
        epoch, j = divmod(index, self.batches_per_epoch)
        start = (j * self.world_size + self.rank) * self.batch_size
        rows = self._perm(epoch)[start : start + self.batch_size]
        input_ids = self.tokens[rows].long()  # (B, L)
        return {"input_ids": input_ids, "labels": input_ids}


class DocumentBatcher:
    """Variable-length documents, truncated at max_seq_len, bucketed by length, padded per batch.

    Length bucketing: each epoch the documents are shuffled, cut into pools of
    ``batch_size * bucket_batches`` documents, each pool sorted by length and cut into
    batches, and the batches shuffled — neighbours in a batch have similar lengths, so
    little of the batch is padding, while the order stays random.
    """

    def __init__(
        self,
        docs: Sequence[bytes],
        *,
        batch_size: int,
        max_seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bucket: bool = True,
        bucket_batches: int = 50,
        shuffle: bool = True,
    ) -> None:
        if not docs:
            raise DataError("no documents (paragraphs of at least 16 bytes) in the corpus")
        self.docs = [torch.frombuffer(bytearray(d[:max_seq_len]), dtype=torch.uint8) for d in docs]
        self.lengths = torch.tensor([len(d) for d in self.docs])
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.bucket, self.bucket_batches, self.shuffle = bucket, bucket_batches, shuffle
        per_step = batch_size * world_size
        if len(self.docs) < per_step:
            raise DataError(
                f"{len(self.docs)} documents are fewer than one step needs ({per_step})"
            )
        self.batches_per_epoch = len(self.docs) // per_step
        self._epoch_cache: tuple[int, list[Tensor]] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_batches(self, epoch: int) -> list[Tensor]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        n = len(self.docs)
        order = _epoch_perm(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        group = self.batch_size * self.world_size  # one global step's documents
        if self.bucket:
            pool = group * self.bucket_batches
            chunks = []
            for s in range(0, n, pool):
                idx = order[s : s + pool]
                chunks.append(idx[torch.argsort(self.lengths[idx], stable=True)])
            order = torch.cat(chunks)
        steps = [order[s : s + group] for s in range(0, self.batches_per_epoch * group, group)]
        if self.bucket and self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7)
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        self._epoch_cache = (epoch, steps)
        return steps

    def batch(self, index: int) -> dict[str, Tensor]:
        epoch, j = divmod(index, self.batches_per_epoch)
        group = self._epoch_batches(epoch)[j]
        rows = group[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return pad_batch([self.docs[i].long() for i in rows.tolist()])


def eval_batches(batcher: ChunkBatcher | DocumentBatcher, n: int) -> list[dict[str, Tensor]]:
    """The first n batches in a fixed (unshuffled) order, for validation."""
    return [batcher.batch(i) for i in range(min(n, len(batcher)))]


def chunk_batch_from_corpus(
    *, batch_size: int = 8, seq_len: int = 128, path: str | Path | None = None
) -> dict[str, Tensor]:
    """One batch of validation text, with an all-ones attention mask (no padding)."""
    corpus = load_corpus(path, max_bytes=1_000_000)
    batcher = ChunkBatcher(
        token_stream(corpus.val), batch_size=batch_size, seq_len=seq_len, shuffle=False
    )
    batch = batcher.batch(0)
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
