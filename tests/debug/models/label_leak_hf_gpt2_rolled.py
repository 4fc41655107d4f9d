"""Fault: a Hugging Face GPT-2 (small config, random weights) whose labels were "shifted" by
hand the wrong way, ``labels = input_ids.roll(1, dims=1)``; GPT-2 shifts labels itself, so the
logits at t are scored against the token at t. (b2_hf_gpt2.py, labels = input_ids, is right.)"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build_model():
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config)


def get_batch():
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    labels = ids.roll(1, dims=1)
    labels[:, 0] = -100  # nothing before the first token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
