"""A stock nn.TransformerEncoder (batch_first=True, default enable_nested_tensor=True) called
with src_key_padding_mask, as in most encoder tutorials. In eval mode without gradients
PyTorch would run it on nested tensors (its "fast path"). Clean, bidirectional."""

import math

import torch
from torch import nn

CAUSAL = False
NTOKEN, D, SEQ = 100, 32, 16


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(NTOKEN, D)
        self.pos = nn.Embedding(SEQ, D)
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=3)
        self.head = nn.Linear(D, NTOKEN)
        nn.init.normal_(self.embedding.weight, std=1 / math.sqrt(D))
        nn.init.normal_(self.pos.weight, std=1 / math.sqrt(D))

    def forward(self, input_ids, attention_mask=None):
        x = self.embedding(input_ids) + self.pos.weight[: input_ids.shape[1]]  # (B, L, D)
        pad = None if attention_mask is None else attention_mask == 0
        return self.head(self.encoder(x, src_key_padding_mask=pad))  # (B, L, V)


def build_model():
    return Encoder()


def get_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, NTOKEN, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding, left-aligned as the nested-tensor path requires
    mask[2, 13:] = 0
    return {"input_ids": ids, "attention_mask": mask}
