"""pytorch/examples' word-language Transformer (sequence-first, dropout 0.2, causal mask),
wrapped the way tdiag's error message asks: batch-first ids in, batch-first logits out.
Clean: no sample sees another, no position sees the future."""

from torch import nn
from word_lm_model import TransformerModel

NTOKEN, SEQ = 100, 16


class BatchFirst(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):  # (B, L)
        return self.lm(input_ids.t()).transpose(0, 1)  # (L, B) in, (L, B, V) -> (B, L, V) out


def build_model():
    return BatchFirst(TransformerModel(NTOKEN, 32, 2, 64, 2, dropout=0.2))
