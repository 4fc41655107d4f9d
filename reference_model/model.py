"""The reference Transformer, in plain PyTorch, top to bottom.

Every component is switchable through :class:`ModelConfig`: token embedding (scaled by
sqrt(d_model) with sinusoidal encodings, as in Vaswani et al. 2017), sinusoidal / learned /
rotary positions, multi-head attention with the explicit (B, L, D) -> (B, H, L, D/H) reshape,
feed-forward (GELU, ReLU, SwiGLU), LayerNorm / RMSNorm, pre-LN / post-LN, dropout, a tied
output head, a causal decoder or a bidirectional encoder, and a KV cache for generation.

This file follows tdiag's model-file contract (`tdiag check reference_model/model.py`):
it defines ``build_model()``, ``get_batch()``, ``decode_with_cache()`` and ``CAUSAL``.
It does not import tdiag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

CAUSAL = True
IGNORE_INDEX = -100

__all__ = [
    "CAUSAL",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MultiHeadAttention",
    "Transformer",
    "build_model",
    "decode_with_cache",
    "get_batch",
    "lm_loss",
    "sinusoidal_encoding",
]


@dataclass
class ModelOutput:
    logits: Tensor  # (B, L, V)
    loss: Tensor | None = None  # 0-d, when labels were given
    attentions: list[Tensor] | None = None  # per layer (B, H, L, L), when return_attn=True


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far: (B, H, T, D/H) each."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls(keys=[None] * n_layers, values=[None] * n_layers)

    @property
    def length(self) -> int:
        k = self.keys[0] if self.keys else None
        return 0 if k is None else k.shape[2]


# --------------------------------------------------------------------------- positions


def sinusoidal_encoding(
    length: int, d_model: int, *, base: float = 10000.0, offset: int = 0
) -> Tensor:
    """PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(pos / base^(2i/d)).

    Returns (length, d_model) float32; defined for any position, so it extrapolates.
    """
    pos = torch.arange(offset, offset + length, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # (D/2,)
    angles = pos * inv_freq  # (L, D/2)
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return pe


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal encodings; a buffer up to max_seq_len, computed on the fly beyond."""

    def __init__(self, max_len: int, d_model: int, base: float) -> None:
        super().__init__()
        self.d_model, self.base = d_model, base
        self.register_buffer(
            "pe", sinusoidal_encoding(max_len, d_model, base=base), persistent=False
        )

    def forward(self, length: int, offset: int = 0) -> Tensor:  # -> (L, D)
        if offset + length <= self.pe.shape[0]:
            return self.pe[offset : offset + length]
        pe = sinusoidal_encoding(length, self.d_model, base=self.base, offset=offset)
        return pe.to(self.pe.device)


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))

    def forward(self, length: int, offset: int = 0) -> Tensor:  # -> (L, D)
        if offset + length > self.max_len:
            raise ValueError(
                f"learned positions only go up to max_seq_len={self.max_len}, "
                f"got a sequence of {offset + length}"
            )
        return self.weight[offset : offset + length]


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotate-half convention."""

    def __init__(self, max_len: int, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self._table(0, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, offset: int, length: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(offset, offset + length, device=self.inv_freq.device).float()
        angles = pos[:, None] * self.inv_freq  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate x of shape (B, H, L, D) as if it sat at positions offset .. offset+L-1."""
        length = x.shape[-2]
        if offset + length <= self.cos.shape[0]:
            cos, sin = self.cos[offset : offset + length], self.sin[offset : offset + length]
        else:
            cos, sin = self._table(offset, length)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------- blocks


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def attention_mask_for(
    attention_mask: Tensor | None, q_len: int, k_len: int, *, causal: bool, device: torch.device
) -> Tensor | None:
    """Boolean mask (B or 1, 1, Lq, Lk), True = may attend; None when nothing is masked.

    Queries sit at the last q_len of k_len positions (a KV cache holds the first ones).
    A query always sees its own key: a padded query whose other keys are all masked would
    otherwise be a fully masked row, whose softmax is 0/0 = NaN.
    """
    if attention_mask is None and (not causal or q_len == 1):
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Lq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Lk)
    allowed = (
        k_pos <= q_pos if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    )
    allowed = allowed[None, None]  # (1, 1, Lq, Lk)
    if attention_mask is not None:
        key_ok = attention_mask.to(device=device, dtype=torch.bool)  # (B, Lk)
        allowed = (allowed & key_ok[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return allowed


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.causal = cfg.n_heads, cfg.head_dim, cfg.causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # packed q, k, v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,  # (B, L, D)
        *,
        attention_mask: Tensor | None = None,  # (B, Lk) 1 = token, 0 = pad
        rotary: Rotary | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        return_attn: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        B, L, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, L, D)
        # (B, L, D) -> (B, L, H, D/H) -> (B, H, L, D/H)
        q = q.view(B, L, H, Dh).transpose(1, 2)
        k = k.view(B, L, H, Dh).transpose(1, 2)
        v = v.view(B, L, H, Dh).transpose(1, 2)
        past = 0
        if cache is not None:
            past_k = cache.keys[layer]
            past = 0 if past_k is None else past_k.shape[2]
        if rotary is not None:
            q, k = rotary(q, past), rotary(k, past)
        if cache is not None:
            if past:
                k = torch.cat([cache.keys[layer], k], dim=2)  # (B, H, T+L, D/H)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        k_len = k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        probs = None
        if return_attn:
            mask = attention_mask_for(attention_mask, L, k_len, causal=self.causal, device=x.device)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)  # (B, H, L, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            y = F.dropout(probs, dropout_p, self.training) @ v  # (B, H, L, D/H)
        elif attention_mask is None and self.causal and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = attention_mask_for(attention_mask, L, k_len, causal=self.causal, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, H, L, D/H) -> (B, L, D)
        return self.proj(y), probs


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        # SwiGLU (Shazeer 2020): silu(x W) * (x V); `gate` is V.
        self.gate = (
            nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
            if cfg.activation == "swiglu"
            else None
        )
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        h = self.fc(x)  # (B, L, F)
        if self.gate is not None:
            h = F.silu(h) * self.gate(x)
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,  # (B, L, D)
        attention_mask: Tensor | None = None,
        rotary: Rotary | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        return_attn: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        kw = dict(attention_mask=attention_mask, rotary=rotary, cache=cache, layer=layer)
        if self.pre_norm:  # x + f(norm(x)): GPT-2 and most modern models
            a, probs = self.attn(self.norm1(x), return_attn=return_attn, **kw)
            x = x + self.drop(a)
            x = x + self.drop(self.mlp(self.norm2(x)))
        else:  # norm(x + f(x)): the original paper
            a, probs = self.attn(x, return_attn=return_attn, **kw)
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.drop(self.mlp(x)))
        return x, probs


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Decoder-only language model (``causal=True``) or bidirectional encoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos: nn.Module | None = None
        self.rotary: Rotary | None = None
        if cfg.pos_encoding == "sinusoidal":
            self.pos = SinusoidalPositions(cfg.max_seq_len, cfg.d_model, cfg.rope_base)
        elif cfg.pos_encoding == "learned":
            self.pos = LearnedPositions(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos_encoding == "rope":
            self.rotary = Rotary(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-LN already normalises the output of every block.
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = cfg.embed_scale
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """N(0, init_std) weights, zero biases; residual projections scaled by 1/sqrt(2 n_layers)
        so the residual stream's variance does not grow with depth (GPT-2)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scaled = name.endswith(("attn.proj.weight", "mlp.proj.weight"))
                nn.init.normal_(
                    p, 0.0, std / math.sqrt(2 * self.config.n_layers) if scaled else std
                )
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # norm gains
                nn.init.ones_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor,  # (B, L) long
        attention_mask: Tensor | None = None,  # (B, L) 1 = token, 0 = pad
        labels: Tensor | None = None,  # (B, L), -100 = ignore; shifted inside when causal
        return_attn: bool = False,
        *,
        kv_cache: KVCache | None = None,
    ) -> ModelOutput:
        L = input_ids.shape[1]
        if kv_cache is not None and attention_mask is not None:
            raise ValueError("kv_cache does not support attention_mask (use equal-length prompts)")
        offset = kv_cache.length if kv_cache is not None else 0
        x = self.embed(input_ids)  # (B, L, D)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos is not None:
            x = x + self.pos(L, offset).to(x.dtype)  # (L, D) broadcast over B
        x = self.drop(x)
        attentions: list[Tensor] | None = [] if return_attn else None
        use_ckpt = (
            self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        )
        for i, block in enumerate(self.blocks):
            if use_ckpt and kv_cache is None and not return_attn:
                x, probs = checkpoint(block, x, attention_mask, self.rotary, use_reentrant=False)
            else:
                x, probs = block(x, attention_mask, self.rotary, kv_cache, i, return_attn)
            if attentions is not None:
                attentions.append(probs)
        logits = self.lm_head(self.norm_f(x))  # (B, L, V)
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels, causal=self.config.causal)
        return ModelOutput(logits=logits, loss=loss, attentions=attentions)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,  # (B, L) prompt, no padding
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the prompt with a KV cache; returns (B, L + max_new_tokens).

        Args:
            input_ids: (B, L) prompt, no padding.
            max_new_tokens: tokens to append (>= 0).
            temperature: divides the logits before sampling (> 0 unless greedy).
            top_k: sample only among the k most likely tokens (>= 1); None = all.
            greedy: take the argmax (temperature and top_k are then ignored).
            generator: random generator for sampling.

        Raises:
            ValueError: an encoder model; bad temperature / top_k / max_new_tokens; a total
                length beyond max_seq_len with learned positions (sinusoidal, RoPE and no
                positions go on past it).
        """
        if not self.config.causal:
            raise ValueError("generate() needs a causal model (causal=True)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        if temperature <= 0 and not greedy:
            raise ValueError(f"temperature must be > 0, got {temperature!r} (or use greedy=True)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
        total = input_ids.shape[1] + max_new_tokens
        if self.config.pos_encoding == "learned" and total > self.config.max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens = {total} > max_seq_len={self.config.max_seq_len}: "
                "learned positions do not extrapolate"
            )
        was_training = self.training
        self.eval()
        try:
            cache = KVCache.empty(len(self.blocks))
            out = input_ids
            logits = self(input_ids, kv_cache=cache).logits[:, -1]  # (B, V)
            for _ in range(max_new_tokens):
                logits = logits.float()
                logits[:, self.config.pad_id] = float("-inf")  # never emit padding
                if greedy:
                    nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
                out = torch.cat([out, nxt], dim=1)
                logits = self(nxt, kv_cache=cache).logits[:, -1]
        finally:
            self.train(was_training)
        return out


def lm_loss(
    logits: Tensor,  # (B, L, V)
    labels: Tensor,  # (B, L), -100 = ignore
    *,
    causal: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy; a causal model predicts labels[t+1] from position t.

    ``reduction="mean"`` averages over the labels that are not ignored, as
    ``F.cross_entropy`` does, except that a batch with no label at all (all padding) gives
    0 instead of 0/0 = NaN.
    """
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        flat_labels,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum" if reduction == "mean" else reduction,
    )
    if reduction == "mean":
        loss = loss / (flat_labels != IGNORE_INDEX).sum().clamp_min(1)  # on device: no sync
    return loss


@torch.no_grad()
def decode_with_cache(model: Transformer, input_ids: Tensor) -> Tensor:
    """Logits (B, L, V) for every position, computed one token at a time through the KV cache.

    Equal (to float tolerance) to ``model(input_ids).logits`` for a causal model.
    """
    cache = KVCache.empty(len(model.blocks))
    steps = [
        model(input_ids[:, t : t + 1], kv_cache=cache).logits for t in range(input_ids.shape[1])
    ]
    return torch.cat(steps, dim=1)


# --------------------------------------------------------------------------- model-file contract


def build_model(cfg: ModelConfig | None = None) -> Transformer:
    """A small default model (d_model 128, 4 heads, 2 layers, seq 128): fast on a CPU."""
    torch.manual_seed(0)
    return Transformer(cfg or ModelConfig())


def get_batch(batch_size: int = 8, seq_len: int = 128) -> dict[str, Tensor]:
    """A batch of real text (Python standard library source, validation split)."""
    from .data import chunk_batch_from_corpus

    return chunk_batch_from_corpus(batch_size=batch_size, seq_len=seq_len)
