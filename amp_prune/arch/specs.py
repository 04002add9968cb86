"""Architecture specs: where the prunable projections of each model family live.

Every other module asks an :class:`ArchSpec` for modules and config fields instead of
hard-coding names such as ``q_proj`` or ``intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from amp_prune.errors import AmpPruneError


@dataclass(frozen=True)
class ArchSpec:
    """Names of the modules and config fields of one decoder-only family.

    Unfused families name ``q/k/v`` and ``gate/up``; fused ones (Phi-3) name ``qkv`` and
    ``gate_up`` instead, with rows laid out ``[q | k | v]`` and ``[gate | up]``.
    """

    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    down: str = "down_proj"
    # config field names
    n_heads_field: str = "num_attention_heads"
    n_kv_field: str = "num_key_value_heads"
    head_dim_field: str = "head_dim"
    inter_field: str = "intermediate_size"
    n_layers_field: str = "num_hidden_layers"

    # ---- module access -------------------------------------------------------------
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the ``nn.ModuleList`` of decoder blocks."""
        return _get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attention(layer), self.o)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp_module(layer), self.down)

    def submodule(self, model: nn.Module, dotted: str) -> nn.Module:
        return _get(model, dotted)

    # ---- shapes ----------------------------------------------------------------------
    def dims(self, config) -> dict[str, int]:
        """Return hidden, n_heads, n_kv, head_dim, intermediate and n_layers of ``config``."""
        n_heads = int(getattr(config, self.n_heads_field))
        n_kv = getattr(config, self.n_kv_field, None) or n_heads
        head_dim = getattr(config, self.head_dim_field, None) or config.hidden_size // n_heads
        return {
            "hidden": int(config.hidden_size),
            "n_heads": n_heads,
            "n_kv": int(n_kv),
            "head_dim": int(head_dim),
            "intermediate": int(getattr(config, self.inter_field)),
            "n_layers": int(getattr(config, self.n_layers_field)),
        }


def _get(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


_LLAMA_LIKE = ArchSpec(model_types=("llama", "mistral", "qwen2", "qwen3"))
_PHI3 = ArchSpec(model_types=("phi3",), q=None, k=None, v=None, qkv="qkv_proj", gate=None, up=None, gate_up="gate_up_proj")

_SPECS: dict[str, ArchSpec] = {t: s for s in (_LLAMA_LIKE, _PHI3) for t in s.model_types}
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
