"""A Hugging Face BERT masked LM (small config, random weights) with a masked-LM batch as
DataCollatorForLanguageModeling makes it: 15 % of the positions replaced by [MASK] and
labelled, -100 everywhere else. Clean, bidirectional: its labels are hidden from it."""

import torch
from transformers import BertConfig, BertForMaskedLM

CAUSAL = False
MASK_ID = 4


def build_model():
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def get_batch():
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(5, 128, (4, 32), generator=g)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    labels = ids.masked_fill(~masked, -100)
    return {
        "input_ids": ids.masked_fill(masked, MASK_ID),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }
