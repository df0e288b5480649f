"""Tiny offline text encoders for the text-to-image tests: a real `Qwen2Tokenizer` over the 256 byte symbols (any
text, one token per byte, no BOS: "" encodes to all padding, as with Qwen3) and a tiny random `Qwen3Model`."""

from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model


def byte_level_tokenizer(model_max_length: int = 64) -> Qwen2Tokenizer:
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    return Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token=None, model_max_length=model_max_length)


def tiny_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 7) -> Qwen3Model:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    return Qwen3Model(config).eval().requires_grad_(False)


def save_tiny_text_encoder(directory: Path, hidden_size: int = 32) -> Path:
    """A from_pretrained directory (tokenizer + model) loadable with `gear_hf.text_encoder.load_text_encoder`."""
    tokenizer = byte_level_tokenizer()
    tiny_text_encoder(tokenizer, hidden_size).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
