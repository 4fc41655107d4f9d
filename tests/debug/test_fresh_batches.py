"""The random batches of data.label-leak keep the file's relation between labels and ids."""

from __future__ import annotations

import torch

from tdiag.debug.fresh_batches import FreshBatches, cut_batch, label_relation


def test_relation_between_labels_and_ids() -> None:
    ids = torch.arange(1, 17).repeat(2, 1)  # (2, 16)
    same = label_relation("labels", ids, ids.clone())
    assert same.shift == 0 and bool(same.follows.all()) and not same.hidden.any()
    y = ids.roll(-1, dims=1)  # nanoGPT's y: the next tokens; the last one is unknown
    nxt = label_relation("targets", ids, y)
    assert nxt.shift == 1 and bool(nxt.follows[:, :-1].all()) and bool(nxt.hidden[:, -1].all())
    assert nxt.ignore_value == -1  # nanoGPT ignores -1
    rolled = ids.roll(1, dims=1)
    rolled[:, 0] = -100
    back = label_relation("labels", ids, rolled)
    assert back.shift == -1 and back.ignore_value == -100 and not back.follows[:, 0].any()
    mlm = torch.full_like(ids, -100)
    mlm[:, 3] = 99  # a masked position: its label is not any visible input
    hidden = label_relation("labels", ids.masked_fill(mlm >= 0, 4), mlm)
    assert hidden.hidden.sum() == 2 and not hidden.follows.any()


def _draw(template: dict, **kw) -> dict:
    rels = tuple(
        label_relation(k, template["input_ids"], template[k]) for k in ("labels",) if k in template
    )
    probe = FreshBatches(
        template, rels, kw.pop("n_ids", 64), kw.pop("pad_id", None), kw.pop("bidirectional", False)
    )
    return probe.batch(torch.Generator().manual_seed(0), torch.device("cpu"))


def test_fresh_batch_keeps_the_relation() -> None:
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)  # Hugging Face style, -100 on pads
    new = _draw({"input_ids": ids, "attention_mask": mask, "labels": labels}, pad_id=0)
    assert not torch.equal(new["input_ids"], ids)  # fresh tokens
    assert bool((new["input_ids"] != 0).all())  # never the pad id
    assert bool((new["attention_mask"] == 1).all())  # no padding
    valid = labels >= 0
    assert torch.equal(new["labels"][valid], new["input_ids"][valid])
    assert bool((new["labels"][~valid] == -100).all())


def test_fresh_batch_hides_what_the_file_hides() -> None:
    ids = torch.randint(5, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, 2:4] = True
    template = {"input_ids": ids.masked_fill(masked, 4), "labels": ids.masked_fill(~masked, -100)}
    new = _draw(template, bidirectional=True)
    assert bool((new["input_ids"][masked] == 4).all())  # the [MASK] token stays
    assert bool((new["labels"][~masked] == -100).all())
    assert not torch.equal(new["labels"][masked], template["labels"][masked])  # fresh labels
    # a bidirectional model sees a label equal to its input: such labels become ignored
    same = {"input_ids": ids, "labels": ids.clone()}
    assert bool((_draw(same, bidirectional=True)["labels"] == -100).all())


def test_cut_batch() -> None:
    b = {"input_ids": torch.zeros(8, 64, dtype=torch.long), "other": torch.zeros(3), "k": "v"}
    cut = cut_batch(b, 4, 32)
    assert cut["input_ids"].shape == (4, 32) and cut["other"].shape == (3,) and cut["k"] == "v"
