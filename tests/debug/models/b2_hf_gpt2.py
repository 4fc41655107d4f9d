"""A Hugging Face GPT-2 built from a small config with random weights (no download), with a
dict batch (input_ids, attention_mask, labels) as a Trainer would give it."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SEQ = 16


def build_model():
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config)


def get_batch():
    ids = torch.randint(0, 128, (4, SEQ))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
