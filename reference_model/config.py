"""Configuration of the reference Transformer.

Every component of the model is switchable here, so that tdiag's checks can be shown on
each variant (and each deliberate fault can be planted by flipping one field).
"""

from __future__ import annotations

from dataclasses import dataclass

BYTE_VOCAB = 256
PAD_ID = 256

POS_ENCODINGS = ("sinusoidal", "learned", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "relu", "swiglu")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and components of a :class:`reference_model.model.Transformer`."""

    vocab_size: int = BYTE_VOCAB + 1
    """Vocabulary size: 256 byte values plus the pad id."""
    pad_id: int = PAD_ID
    """Token id of padding (masked out of attention and of the loss)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    n_layers: int = 2
    """Number of Transformer blocks."""
    d_ff: int | None = None
    """Hidden width of the feed-forward network; None = 4 * d_model (8/3 * d_model for SwiGLU,
    which keeps the parameter count equal to a 4x GELU MLP)."""
    max_seq_len: int = 128
    """Longest sequence for learned positions (sinusoidal and RoPE extrapolate beyond it)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities, and residual branches."""
    pos_encoding: str = "sinusoidal"
    """'sinusoidal' (Vaswani et al. 2017), 'learned', 'rope' (Su et al. 2021) or 'none'."""
    rope_base: float = 10000.0
    """Base of the RoPE / sinusoidal frequencies."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    norm_position: str = "pre"
    """'pre' (GPT-2 style, norm inside the residual branch) or 'post' (original paper)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    activation: str = "gelu"
    """Feed-forward activation: 'gelu', 'relu' or 'swiglu'."""
    tie_embeddings: bool = True
    """Share the output projection with the token embedding."""
    causal: bool = True
    """True = decoder-only language model; False = bidirectional encoder."""
    bias: bool = True
    """Biases in the linear layers and LayerNorm."""
    init_std: float = 0.02
    """Std of the normal init of weights; residual output projections get
    init_std / sqrt(2 * n_layers) (GPT-2)."""
    scale_embeddings: bool | None = None
    """Multiply token embeddings by sqrt(d_model); None = only with sinusoidal encodings,
    where the original paper does it so that tokens are not drowned by the encoding."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (torch.utils.checkpoint)."""

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {self.vocab_size!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be in [0, vocab_size), got {self.pad_id!r}")
        if self.d_model <= 0 or self.n_heads <= 0 or self.n_layers <= 0:
            raise ValueError(
                f"d_model, n_heads, n_layers must be > 0, got "
                f"{self.d_model!r}, {self.n_heads!r}, {self.n_layers!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got {self.d_model!r} and {self.n_heads!r}"
            )
        if self.pos_encoding == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rope needs an even head dim, got {self.d_model // self.n_heads!r}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0, got {self.max_seq_len!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"d_ff must be > 0, got {self.d_ff!r}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        """The feed-forward hidden width actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            # 2/3 of 4*d keeps the parameter count of a 4x MLP; round up to a multiple of 8.
            return ((8 * self.d_model // 3) + 7) // 8 * 8
        return 4 * self.d_model

    @property
    def embed_scale(self) -> float:
        scale = self.scale_embeddings
        if scale is None:
            scale = self.pos_encoding == "sinusoidal"
        return self.d_model**0.5 if scale else 1.0
