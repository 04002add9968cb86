"""Which stock Hugging Face class can express a pruned shape, and which head counts it can express at all.

``LlamaConfig`` in transformers 5 rejects ``hidden_size % num_attention_heads != 0``.
``MistralForCausalLM`` computes exactly what Llama computes when there are no biases and no
sliding window, and has no such check, so such a Llama is exported as Mistral (the export's
reload-and-compare check proves the equivalence on every run). Gemma 2 and Gemma 3 configs
make the same check and have no such fallback; Helium's ``o_proj`` reads ``hidden_size``
inputs whatever the head count, so its heads cannot be removed at all.
"""

from __future__ import annotations

import copy
import functools
import json

from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, PretrainedConfig

from amp_prune.arch.specs import ArchSpec
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
                            f"({config.num_attention_heads} heads, hidden {config.hidden_size}); keep a head count "
                            "that divides the hidden size")
    d = {k: v for k, v in config.to_dict().items() if k not in _DROP_FOR_MISTRAL}
    mcfg = MistralConfig(**{**d, "sliding_window": None})
    mcfg.architectures = ["MistralForCausalLM"]
    return mcfg


@functools.lru_cache(maxsize=512)
def _builds(config_json: str, spec: ArchSpec, n_heads: int, n_kv: int) -> bool:
    config = AutoConfig.for_model(**json.loads(config_json))
    d = spec.dims(config)
    spec.set_width(config, n_heads, n_kv, d["head_dim"], d["intermediate"])
    try:
        config = native_config(config) or config
    except AmpPruneError:
        return False
    with init_empty_weights(include_buffers=True):  # weightless: only the shapes the stock class builds
        layer = spec.get_layers(AutoModelForCausalLM.from_config(config))[0]
    attn, hd = spec.attention(layer), d["head_dim"]
    q = spec.query_weight(attn, {**d, "n_heads": n_heads})
    return q.shape[0] == n_heads * hd and spec.o_proj(layer).weight.shape[1] == n_heads * hd


def expressible(config: PretrainedConfig, spec: ArchSpec, n_heads: int, n_kv: int) -> bool:
    """Whether a stock class (the family's own, or the Mistral fallback) builds blocks of ``n_heads``/``n_kv`` heads.

    Checked by building the pruned config's model on the meta device (no weights): the config must
    validate, and its first block's ``q_proj`` rows and ``o_proj`` columns must be ``n_heads * head_dim``.
    """
    d = spec.dims(config)
    if (n_heads, n_kv) == (d["n_heads"], d["n_kv"]):
        return True
    cfg = copy.deepcopy(config).to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return _builds(json.dumps(cfg, sort_keys=True, default=str), spec, n_heads, n_kv)
