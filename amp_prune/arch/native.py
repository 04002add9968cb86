"""Which stock Hugging Face class can express a pruned shape.

``LlamaConfig`` in transformers 5 rejects ``hidden_size % num_attention_heads != 0``.
``MistralForCausalLM`` computes exactly what Llama computes when there are no biases and no
sliding window, and has no such check, so such a Llama is exported as Mistral (the export's
reload-and-compare check proves the equivalence on every run).
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import MistralConfig, PretrainedConfig

from amp_prune.errors import AmpPruneError

_DROP_FOR_MISTRAL = ("model_type", "architectures", "pretraining_tp", "attention_bias", "mlp_bias",
                     "transformers_version", "layer_types")


def config_is_valid(config: PretrainedConfig) -> bool:
    """Whether stock transformers accepts ``config`` as it is (the same check a reload runs)."""
    try:
        type(config)(**config.to_dict())
        return True
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return False


def native_config(config: PretrainedConfig) -> PretrainedConfig | None:
    """``None`` when ``config`` reloads as it is; else the equivalent ``MistralConfig``, or a one-line error."""
    if config_is_valid(config):
        return None
    if config.model_type != "llama" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AmpPruneError(f"the pruned {config.model_type} config is rejected by transformers "
                            f"({config.num_attention_heads} heads, hidden {config.hidden_size}); try --gqa-mode group")
    d = {k: v for k, v in config.to_dict().items() if k not in _DROP_FOR_MISTRAL}
    mcfg = MistralConfig(**{**d, "sliding_window": None})
    mcfg.architectures = ["MistralForCausalLM"]
    return mcfg
