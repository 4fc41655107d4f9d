"""Fault: a Hugging Face GPT-2 (small config, random weights) fed labels = input_ids after
padding, as with DataCollatorWithPadding: GPT-2's loss ignores only -100, so the pads count.
(b2_hf_gpt2.py, with -100 on its pads, is the correct batch.)"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

PAD = 0


def build_model():
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, pad_token_id=PAD
    )
    return GPT2LMHeadModel(config)


def get_batch():
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 128, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 4:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
