"""Configuration of the reference Transformer (:class:`ModelConfig`) and of its training loop
(:class:`TrainConfig`).

Every component of the model is switchable here, so that tdiag's checks can be shown on
each variant (and each deliberate fault can be planted by flipping one field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every flag of the training loop (``python -m reference_model.train --help``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # data
    data: str | None = _f(None, "Text file or folder; default: the Python standard library source.")
    data_max_bytes: int = _f(3_000_000, "Read at most this many bytes of corpus.")
    batching: str = _f(
        "chunks", "'chunks' (fixed-length stream chunks) or 'documents' (padded, bucketed)."
    )
    bucket: bool = _f(True, "Length-bucketing sampler in 'documents' mode.")
    seq_len: int | None = _f(None, "Training sequence length; default: model.max_seq_len.")
    batch_size: int = _f(16, "Sequences per micro-batch (per rank).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    # optimisation
    steps: int = _f(200, "Optimizer steps.")
    lr: float = _f(1e-3, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor, as a fraction of lr.")
    schedule: str = _f(
        "cosine", "'cosine' (linear warmup then cosine), 'noam' (inverse sqrt), 'constant'."
    )
    warmup_steps: int = _f(20, "Linear warmup steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy.")
    precision: str = _f(
        "fp32", "'fp32', 'bf16' (autocast, CPU or CUDA) or 'fp16' (CUDA, GradScaler)."
    )
    mlm_prob: float = _f(
        0.15, "Encoder (causal=False) only: fraction of tokens corrupted to predict."
    )
    # evaluation, stopping, checkpoints
    eval_every: int = _f(
        50, "Evaluate on the validation split every N steps (0 = only at the end)."
    )
    eval_batches: int = _f(8, "Validation batches per evaluation.")
    early_stopping_patience: int = _f(0, "Stop after N evaluations without improvement (0 = off).")
    early_stopping_min_delta: float = _f(0.0, "Improvement smaller than this does not count.")
    out_dir: str | None = _f(None, "Run folder (checkpoints); None = write nothing.")
    checkpoint_every: int = _f(
        0, "Write a checkpoint every N steps (0 = only at the end, if out_dir)."
    )
    resume: bool = _f(False, "Resume from out_dir/checkpoint.pt when it exists.")
    # runtime
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'.")
    seed: int = _f(0, "Random seed.")
    log_every: int = _f(10, "Log (one host sync) every N steps.")
    quiet: bool = _f(False, "No progress output.")

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "grad_accum",
            "steps",
            "log_every",
            "eval_batches",
            "data_max_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.batching not in ("chunks", "documents"):
            raise ValueError(f"batching must be 'chunks' or 'documents', got {self.batching!r}")
        if self.schedule not in ("cosine", "noam", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'noam' or 'constant', got {self.schedule!r}"
            )
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        non_negative = (
            "grad_clip",
            "warmup_steps",
            "eval_every",
            "weight_decay",
            "early_stopping_patience",
            "early_stopping_min_delta",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"mlm_prob must be in (0, 1), got {self.mlm_prob!r}")
        if (self.resume or self.checkpoint_every) and not self.out_dir:
            raise ValueError("resume and checkpoint_every need out_dir (where checkpoints live)")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len!r}")
        if (
            self.seq_len is not None
            and self.seq_len > self.model.max_seq_len
            and (self.model.pos_encoding == "learned")
        ):
            raise ValueError(
                f"seq_len {self.seq_len} > max_seq_len {self.model.max_seq_len} with learned positions"
            )

    @property
    def train_seq_len(self) -> int:
        return self.seq_len or self.model.max_seq_len
