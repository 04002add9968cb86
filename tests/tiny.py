"""Tiny random models and a character tokenizer, built offline from config."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Cohere2Config, CohereConfig, Exaone4Config, Gemma2Config, GemmaConfig,
                          Gemma3TextConfig, GlmConfig, GraniteConfig, HeliumConfig, LlamaConfig, MistralConfig,
                          Olmo2Config, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config, SmolLM3Config)

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

# families with per-layer attention types get a window shorter than the test batches (up to 40 tokens) and
# a mix of layer types, so a runner that hands every block block 0's mask or rotary tables is caught
WINDOW = 8
SLIDING_FULL = ["sliding_attention", "full_attention", "sliding_attention"]
MORE_CONFIGS = {
    "gemma": lambda: GemmaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   sliding_window=WINDOW, layer_types=SLIDING_FULL, query_pre_attn_scalar=16,
                                   final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    # the Gemma 3 270M layout: one KV head, head_dim * heads != hidden, two RoPE bases
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                            sliding_window=WINDOW, layer_types=SLIDING_FULL, query_pre_attn_scalar=32,
                                            rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 10.0},
                                                             "full_attention": {"rope_type": "default",
                                                                                "rope_theta": 10000.0}}),
    "olmo2": lambda: Olmo2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "exaone4": lambda: Exaone4Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                     layer_types=SLIDING_FULL),
    "granite": lambda: GraniteConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, residual_multiplier=0.5,
                                     embedding_multiplier=3.0, attention_multiplier=0.2, logits_scaling=2.0),
    "helium": lambda: HeliumConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "smollm3": lambda: SmolLM3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 0, 1]),
    "glm": lambda: GlmConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "cohere": lambda: CohereConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True,
                                   logit_scale=0.5),
    "cohere2": lambda: Cohere2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     sliding_window=WINDOW, layer_types=SLIDING_FULL),
}
CONFIGS.update(MORE_CONFIGS)


def tiny_model(kind: str, seed: int = 0, dtype=torch.float32, layers: int | None = None):
    """A randomly initialised tiny model of family ``kind`` with non-trivial biases/norms."""
    torch.manual_seed(seed)
    cfg = CONFIGS[kind]()
    if layers is not None:
        cfg.num_hidden_layers = layers
        for name in ("layer_types", "no_rope_layers"):  # per-layer lists: the pattern repeats
            value = getattr(cfg, name, None)
            if value is not None:
                setattr(cfg, name, [value[i % len(value)] for i in range(layers)])
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model
