"""The whole model: causality, padding invariance, KV cache, variants, init, model-file contract."""

from __future__ import annotations

import math

import pytest
import torch

from reference_model import model as model_file
from reference_model.config import ModelConfig
from reference_model.model import Transformer, decode_with_cache, lm_loss

VARIANTS = [
    dict(pos_encoding="sinusoidal"),
    dict(pos_encoding="learned", norm="rmsnorm", activation="relu"),
    dict(pos_encoding="rope", activation="swiglu", bias=False),
    dict(pos_encoding="rope", norm_position="post", tie_embeddings=False),
]


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def ids(b: int = 2, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", VARIANTS)
def test_causality(kw) -> None:
    m = tiny(**kw)
    x = ids()
    t = 5
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 17) % 256
    with torch.no_grad():
        a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4)


def test_encoder_sees_the_future() -> None:
    """The causality test above would fail on a bidirectional model."""
    m = tiny(causal=False)
    x = ids()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(m(x).logits[:, 0], m(y).logits[:, 0], atol=1e-5)


@pytest.mark.parametrize("kw", [*VARIANTS, dict(causal=False)])
@pytest.mark.parametrize("return_attn", [False, True])
def test_padding_does_not_change_real_positions(kw, return_attn) -> None:
    m = tiny(**kw)
    x = ids(n=10)
    padded = torch.cat([x, torch.full((2, 6), m.config.pad_id)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1).long()
    with torch.no_grad():
        ref = m(x).logits
        got = m(padded, attention_mask=mask, return_attn=return_attn).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, :10], ref, atol=1e-5, rtol=1e-5)


def test_padding_without_mask_does_change_outputs() -> None:
    """... so the test above can fail: the mask is what makes padding invisible."""
    m = tiny(causal=False)
    x = ids(n=10)
    padded = torch.cat([x, torch.full((2, 6), m.config.pad_id)], dim=1)
    with torch.no_grad():
        assert not torch.allclose(m(padded).logits[:, :10], m(x).logits, atol=1e-4)


@pytest.mark.parametrize("kw", VARIANTS[:3])
def test_kv_cache_logits_equal_full_forward(kw) -> None:
    m = tiny(**kw)
    x = ids(n=20)
    with torch.no_grad():
        full = m(x).logits
    cached = decode_with_cache(m, x)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_generate_greedy_matches_full_forward_argmax() -> None:
    m = tiny(pos_encoding="rope")
    prompt = ids(n=6)
    out = m.generate(prompt, 10, greedy=True)
    assert out.shape == (2, 16)
    assert torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        logits = m(out).logits[:, 5:-1]  # the prediction for each generated token
    logits[..., m.config.pad_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), out[:, 6:])


def test_generate_sampling_respects_top_k_and_seed() -> None:
    m = tiny()
    prompt = ids(b=1, n=4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.generate(prompt, 8, temperature=0.9, top_k=5, generator=g1)
    b = m.generate(prompt, 8, temperature=0.9, top_k=5, generator=g2)
    assert torch.equal(a, b)
    assert (a < 256).all()  # never the pad id
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 2, temperature=0.0)


def test_attention_probs_are_causal_and_normalised() -> None:
    m = tiny()
    with torch.no_grad():
        out = m(ids(), return_attn=True)
    assert len(out.attentions) == 2
    p = out.attentions[0]
    assert p.shape == (2, 4, 12, 12)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
    assert p.triu(1).abs().max() == 0


def test_init_loss_is_about_ln_vocab() -> None:
    m = tiny()
    x = ids(b=4, n=32)
    with torch.no_grad():
        loss = m(x, labels=x).loss
    assert abs(loss.item() - math.log(257)) < 0.15


def test_tied_and_untied_head() -> None:
    m = tiny()
    assert m.lm_head.weight is m.embed.weight
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight is not u.embed.weight
    assert sum(p.numel() for p in u.parameters()) > sum(p.numel() for p in m.parameters())


def test_embedding_scale_only_with_sinusoidal() -> None:
    assert tiny(pos_encoding="sinusoidal").embed_scale == pytest.approx(math.sqrt(32))
    assert tiny(pos_encoding="rope").embed_scale == 1.0
    assert tiny(pos_encoding="learned", scale_embeddings=True).embed_scale == pytest.approx(
        math.sqrt(32)
    )


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    x = ids(n=16)
    grads = []
    for ckpt in (False, True):
        m = tiny(activation_checkpointing=ckpt, dropout=0.0).train()
        m(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_label_smoothing_equals_torch_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 257)
    labels = torch.randint(0, 256, (2, 9))
    labels[1, 6:] = -100
    got = lm_loss(logits, labels, causal=True, label_smoothing=0.1)
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 257),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=0.1,
    )
    torch.testing.assert_close(got, want)
    # smoothing changes the loss (the comparison is not vacuous)
    assert not torch.allclose(got, lm_loss(logits, labels, causal=True))
    # by hand: (1 - eps) * nll + eps * mean over classes of -log p
    logp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    manual = ((0.9 * nll + 0.1 * smooth)[keep]).mean()
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="'nope'"):
        ModelConfig(pos_encoding="nope")


def test_model_file_contract() -> None:
    assert model_file.CAUSAL is True
    m = model_file.build_model()
    batch = model_file.get_batch()
    assert batch["input_ids"].shape == (8, 128) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (8, 128)
    assert int(batch["input_ids"].max()) < 256
    names = dict(m.named_modules())
    for name in (
        "embed",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.0.norm1",
        "blocks.0.norm2",
        "norm_f",
        "lm_head",
    ):
        assert name in names
    m.eval()
    x = batch["input_ids"][:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(
            model_file.decode_with_cache(m, x), m(x).logits, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "rope", "none"])
def test_longer_than_max_seq_len_and_kv_cache_past_it(pos_encoding: str) -> None:
    """Positions that extrapolate: a forward of 2.5x max_seq_len works, and the KV cache that
    grows past max_seq_len still equals the full forward."""
    m = tiny(pos_encoding=pos_encoding, max_seq_len=16)
    x = ids(n=40)
    with torch.no_grad():
        full = m(x).logits
    assert full.shape == (2, 40, 257) and torch.isfinite(full).all()
    torch.testing.assert_close(decode_with_cache(m, x), full, atol=1e-5, rtol=1e-4)
    out = m.generate(x[:, :6], 30, greedy=True)  # ends at 36 > 16
    with torch.no_grad():
        logits = m(out).logits[:, 5:-1]
    logits[..., m.config.pad_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), out[:, 6:])


def test_learned_positions_refuse_longer_sequences_clearly() -> None:
    m = tiny(pos_encoding="learned", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(ids(n=17))
    with pytest.raises(ValueError, match="max_seq_len=16"):  # before generating anything
        m.generate(ids(n=6), 11)
    assert m.generate(ids(n=6), 10, greedy=True).shape == (2, 16)  # exactly the limit is fine


def test_sampling_stays_in_top_k_and_low_temperature_is_greedy() -> None:
    m = tiny(pos_encoding="rope")
    prompt = ids(b=4, n=4)
    greedy = m.generate(prompt, 12, greedy=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(prompt, 12, top_k=1, generator=g), greedy)
    assert torch.equal(m.generate(prompt, 12, temperature=1e-4, generator=g), greedy)

    def ranks(out: torch.Tensor) -> torch.Tensor:
        """Rank of each generated token among the full forward's logits at its position."""
        with torch.no_grad():
            logits = m(out).logits[:, 3:-1]
        logits[..., m.config.pad_id] = float("-inf")
        chosen = logits.gather(-1, out[:, 4:, None])
        return (logits > chosen).sum(-1)

    top3 = m.generate(prompt, 12, temperature=2.0, top_k=3, generator=g)
    assert ranks(top3).max() < 3
    anything = m.generate(prompt, 12, temperature=2.0, generator=g)
    assert ranks(anything).max() >= 3  # without top_k the check above could fail
    with pytest.raises(ValueError, match="top_k"):
        m.generate(prompt, 2, top_k=0)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False), dict(pos_encoding="rope")])
def test_fully_padded_rows_give_finite_logits_loss_and_grads(kw) -> None:
    m = tiny(**kw).train()
    x = ids(b=3, n=10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1] = 0  # a row that is padding only
    mask[2, :4] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    for return_attn in (False, True):
        m.zero_grad()
        out = m(x, attention_mask=mask, labels=labels, return_attn=return_attn)
        out.loss.backward()
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # a batch of padding only: loss 0, not 0/0
    empty = m(x, attention_mask=torch.zeros_like(mask), labels=torch.full_like(x, -100)).loss
    assert empty.item() == 0.0
