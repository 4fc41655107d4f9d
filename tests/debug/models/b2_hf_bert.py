"""A Hugging Face BERT masked-LM built from a small config with random weights (no download):
a bidirectional encoder (CAUSAL = False) with a right-padded dict batch."""

import torch
from transformers import BertConfig, BertForMaskedLM

CAUSAL = False


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
    ids = torch.randint(5, 128, (4, 16))
    mask = torch.ones_like(ids)
    ids[0, 12:], mask[0, 12:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}
