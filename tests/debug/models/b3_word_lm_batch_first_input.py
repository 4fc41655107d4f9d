"""Bug: the same sequence-first word-language Transformer (batch_first=False) given
batch-first ids (B, L). Its causal mask then runs along the batch: sample 0 sees no other
sample, sample b sees samples 0..b, and each sequence's own positions never meet."""

from word_lm_model import TransformerModel

NTOKEN, SEQ = 100, 16


def build_model():
    return TransformerModel(NTOKEN, 32, 2, 64, 2, dropout=0.2)
