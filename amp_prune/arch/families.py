"""One :class:`ArchSpec` per family group: what each group's blocks, attention and head do differently.

Each group was added by reading its transformers 5 modeling file; a tiny random model of every
listed ``model_type`` prunes, exports, reloads with plain ``from_pretrained``, matches the stock
logits and replays its plan (``tests/arch/test_families.py``).

* Llama layout (pre-norm; ``h + attn(norm(h))``, ``h + mlp(norm(h))``): llama, mistral, qwen2,
  qwen3, helium, smollm3 (``no_rope_layers`` is per block), gemma (GeGLU, embeddings scaled by
  ``sqrt(hidden)`` inside the model's forward, which the block runner captures).
* Fused projections: phi3 (``qkv_proj`` and ``gate_up_proj``), glm (``gate_up_proj``).
* Pre- and post-norm (``h + N(o_proj(...))``): gemma2 (final-logit softcapping), gemma3_text (sliding and
  full layers with their own RoPE base and mask). Post-norm only: olmo2 (q/k norms over all heads:
  surgery slices them), exaone4.
* Granite: Llama layout with a residual multiplier and a logits divisor.
* Parallel blocks (``h + attn(norm(h)) + mlp(norm(h))``): cohere (q/k norms per head), cohere2.
"""

from __future__ import annotations

from amp_prune.arch.specs import ArchSpec
from amp_prune.errors import AmpPruneError

_POST = ("post_attention_layernorm", "post_feedforward_layernorm")

_LLAMA_LIKE = ArchSpec(model_types=("llama", "mistral", "qwen2", "qwen3", "helium", "gemma"),
                       head_norms=("q_norm", "k_norm"))
_SMOLLM3 = ArchSpec(model_types=("smollm3",), per_layer_fields=("layer_types", "no_rope_layers"))
_PHI3 = ArchSpec(model_types=("phi3",), q=None, k=None, v=None, qkv="qkv_proj", gate=None, up=None,
                 gate_up="gate_up_proj", attn_attrs=("num_key_value_groups", "num_key_value_heads", "head_dim"), mlp_attrs=())
_GLM = ArchSpec(model_types=("glm",), gate=None, up=None, gate_up="gate_up_proj", mlp_attrs=())
_GEMMA2 = ArchSpec(model_types=("gemma2", "gemma3_text"), post_norms=_POST, head_norms=("q_norm", "k_norm"),
                   logit_softcap="final_logit_softcapping")
_POST_ONLY = ArchSpec(model_types=("olmo2", "exaone4"), post_norms=_POST, head_norms=("q_norm", "k_norm"))
_GRANITE = ArchSpec(model_types=("granite",), residual_multiplier="residual_multiplier", logit_divisor="logits_scaling")
_COHERE = ArchSpec(model_types=("cohere", "cohere2"), head_norms=("q_norm", "k_norm"), logit_scale="logit_scale")

_GROUPS = (_LLAMA_LIKE, _SMOLLM3, _PHI3, _GLM, _GEMMA2, _POST_ONLY, _GRANITE, _COHERE)
_SPECS: dict[str, ArchSpec] = {t: s for s in _GROUPS for t in s.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))


def get_spec(model_type: str) -> ArchSpec:
    """Return the spec of ``model_type`` or raise a one-line error naming the supported ones."""
    try:
        return _SPECS[model_type]
    except KeyError:
        raise AmpPruneError(
            f"unsupported architecture '{model_type}': amp-prune supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; open an issue to request another family"
        ) from None
