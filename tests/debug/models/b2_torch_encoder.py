"""A user's encoder built on torch.nn.TransformerEncoder (sequence-first, as the PyTorch
tutorial writes it), with sinusoidal positions and a padding mask. Bidirectional."""

import math

import torch
from torch import nn

CAUSAL = False
NTOKEN, D, SEQ = 100, 32, 16


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=512):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):  # (L, B, D)
        return x + self.pe[: x.size(0)]


class EncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(NTOKEN, D)
        self.pos_encoder = PositionalEncoding(D)
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=64, dropout=0.1)
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=2, enable_nested_tensor=False
        )
        self.linear = nn.Linear(D, NTOKEN)
        # as in the PyTorch tutorial: with the default N(0, 1) embedding, x * sqrt(D) would
        # feed attention scores ~D and collapse it (tdiag flags that: attn.entropy-collapse)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.linear.bias.data.zero_()
        self.linear.weight.data.uniform_(-0.1, 0.1)

    def forward(self, input_ids, attention_mask=None, labels=None):
        src = self.embedding(input_ids).transpose(0, 1) * math.sqrt(D)  # (L, B, D)
        src = self.pos_encoder(src)
        pad = None if attention_mask is None else attention_mask == 0
        out = self.transformer_encoder(src, src_key_padding_mask=pad)
        logits = self.linear(out).transpose(0, 1)  # (B, L, V)
        if labels is None:
            return logits
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, NTOKEN), labels.reshape(-1), ignore_index=-100
        )
        return logits, loss


def build_model():
    return EncoderModel()


def get_batch():
    ids = torch.randint(1, NTOKEN, (4, SEQ))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    ids[0, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
