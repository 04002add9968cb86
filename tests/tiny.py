"""Tiny random models and a character tokenizer, built offline from config."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

VOCAB = 128


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-3 are specials, then printable ASCII."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    return fast


COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)

CONFIGS = {
    "llama_mha": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                     tie_word_embeddings=False),
    "llama_gqa": lambda: LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                     tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
    "qwen3": lambda: Qwen3Config(**COMMON, num_attention_heads=6, num_key_value_heads=3, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
}


def tiny_model(kind: str, seed: int = 0, dtype=torch.float32, layers: int | None = None):
    """A randomly initialised tiny model of family ``kind`` with non-trivial biases/norms."""
    torch.manual_seed(seed)
    cfg = CONFIGS[kind]()
    if layers is not None:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [cfg.layer_types[0]] * layers
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model
