"""Bug: a nanoGPT-style forward(idx, targets=None) that returns the last position only
without targets (as nanoGPT does at inference), and whose loss with targets raises: the
targets are not flattened like the logits."""

import torch.nn.functional as F
from torch import nn

V, BLOCK, D = 40, 16, 16


class LastOnlyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(BLOCK, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        if targets is None:
            return self.head(x[:, [-1], :]), None  # inference: the last position only
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, V), targets)  # bug: targets.view(-1)
        return logits, loss


def build_model():
    return LastOnlyLM()
