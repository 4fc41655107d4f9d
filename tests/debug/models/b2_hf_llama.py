"""A Hugging Face Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) from a small config with
random weights (no download), with a left-padded dict batch and labels."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model():
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def get_batch():
    ids = torch.randint(0, 128, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
