"""Architecture specs: where the prunable projections of each model family live, and how its block adds them.

Every other module asks an :class:`ArchSpec` for modules, weight slices and config fields
instead of hard-coding names such as ``q_proj`` or ``intermediate_size``. Fused families
(Phi-3, GLM) keep ``[q | k | v]`` rows in one ``qkv_proj`` and/or ``[gate | up]`` rows in one
``gate_up_proj``; the methods below hide that difference from scoring, budgeting, surgery
and fine-tuning. The specs themselves, one per family group, are in :mod:`amp_prune.arch.families`.

What reaches the residual stream from a projection's output ``u`` ``[N, H]`` (:meth:`ArchSpec.branch`):

* pre-norm blocks (Llama): ``u``;
* with a residual multiplier ``r`` (Granite): ``r * u``;
* with a post-norm (Gemma 2/3, OLMo 2, EXAONE 4): ``N(u) = w * u / sqrt(mean_j u_j^2 + eps)``, per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from amp_prune.errors import AmpPruneError


@dataclass(frozen=True)
class ArchSpec:
    """Names of the modules and config fields of one decoder-only family."""

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
    # module attributes that cache a shape and must follow the surgery
    attn_attrs: tuple[str, ...] = ("num_key_value_groups", "head_dim")
    mlp_attrs: tuple[str, ...] = ("intermediate_size",)
    # config field names
    n_heads_field: str = "num_attention_heads"
    n_kv_field: str = "num_key_value_heads"
    head_dim_field: str = "head_dim"
    inter_field: str = "intermediate_size"
    n_layers_field: str = "num_hidden_layers"
    per_layer_fields: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
    # ---- how the block adds its branches, and how the head forms logits (see the module docstring) ----
    post_norms: tuple[str, str] | None = None  # block norms applied to o_proj's / down_proj's output before the add
    head_norms: tuple[str, str] | None = None  # attention's q/k norms; sliced by surgery where they span heads
    residual_multiplier: str | None = None  # config field r: the block adds r * branch (Granite)
    logit_scale: str | None = None  # config field multiplying the logits (Cohere)
    logit_divisor: str | None = None  # config field dividing the logits (Granite)
    logit_softcap: str | None = None  # config field cap: logits -> cap * tanh(logits / cap) (Gemma 2)

    # ---- module access -------------------------------------------------------------
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        """Return the ``nn.ModuleList`` of decoder blocks."""
        return _get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attn)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.mlp)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return _get(self.attention(layer), self.o)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return _get(self.mlp_module(layer), self.down)

    def submodule(self, model: nn.Module, dotted: str) -> nn.Module:
        return _get(model, dotted)

    def projection_names(self) -> list[str]:
        """Every attention and MLP projection (LoRA targets): q/k/v or qkv, o, gate/up or gate_up, down."""
        names = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        return names + [self.o] + ([self.gate_up] if self.gate_up else [self.gate, self.up]) + [self.down]

    def post_norm(self, layer: nn.Module, which: str) -> nn.Module | None:
        """The norm applied to ``o_proj``'s (``which="o"``) or ``down_proj``'s output before the residual add."""
        if self.post_norms is None:
            return None
        return _get(layer, self.post_norms[0 if which == "o" else 1])

    def branch(self, layer: nn.Module, which: str, u: torch.Tensor, config) -> torch.Tensor:
        """What the residual stream receives from projection output ``u`` ``[..., H]`` (module docstring)."""
        norm = self.post_norm(layer, which)
        if norm is not None:
            u = norm(u)
        if self.residual_multiplier is not None:
            u = u * float(getattr(config, self.residual_multiplier))
        return u

    def branch_target(self, layer: nn.Module, which: str, delta: torch.Tensor, u: torch.Tensor, config) -> torch.Tensor:
        """A projection output ``[N, H]`` whose branch adds ``delta`` ``[N, H]`` to the residual (:meth:`branch` inverted).

        Exact for ``u`` and ``r * u``. A post-norm fixes each token's magnitude, so only a direction can be
        matched: the target keeps the current output ``u``'s scale, ``delta / w * rms(u)`` (``w`` the norm's
        per-channel weight; where ``|w|`` is below 1e-3 of its mean, ``u`` is kept), which is ``u`` again when
        ``delta = N(u)``.
        """
        norm = self.post_norm(layer, which)
        if norm is not None:
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
            ones = torch.ones(1, delta.shape[-1], dtype=torch.float32, device=delta.device)
            w = (norm(ones.to(next(norm.parameters()).dtype)).float() * (1 + eps) ** 0.5).to(delta.dtype)[0]
            rms = u.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
            ok = w.abs() > 1e-3 * w.abs().mean()
            return torch.where(ok, delta / torch.where(ok, w, torch.ones_like(w)) * rms, u)
        if self.residual_multiplier is not None:
            return delta / float(getattr(config, self.residual_multiplier))
        return delta

    def logit_transform(self, config, logits: torch.Tensor) -> torch.Tensor:
        """The family's map from ``lm_head``'s output to the logits (identity for Llama)."""
        if self.logit_scale is not None:
            logits = logits * float(getattr(config, self.logit_scale))
        if self.logit_divisor is not None:
            logits = logits / float(getattr(config, self.logit_divisor))
        cap = getattr(config, self.logit_softcap, None) if self.logit_softcap is not None else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- layout of the rows a unit owns ------------------------------------------------
    def query_weight(self, attn: nn.Module, d: dict[str, int]) -> torch.Tensor:
        """The query rows ``[n_heads*head_dim, hidden]`` (a view into ``qkv_proj`` for fused families)."""
        if self.qkv:
            return _get(attn, self.qkv).weight[: d["n_heads"] * d["head_dim"]]
        return _get(attn, self.q).weight

    def qkv_has_bias(self, attn: nn.Module) -> bool:
        return _get(attn, self.qkv or self.q).bias is not None

    def gate_up_weights(self, mlp: nn.Module, d: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up rows, each ``[intermediate, hidden]``."""
        if self.gate_up:
            w = _get(mlp, self.gate_up).weight
            return w[: d["intermediate"]], w[d["intermediate"]:]
        return _get(mlp, self.gate).weight, _get(mlp, self.up).weight

    def up_has_bias(self, mlp: nn.Module) -> bool:
        return _get(mlp, self.gate_up or self.up).bias is not None

    def qkv_rows(self, attn: nn.Module, d: dict[str, int], q_rows: torch.Tensor,
                 kv_rows: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
        """(projection, output rows to keep) for q, k and v, given the kept query and KV rows."""
        if self.qkv:
            q_len, kv_len = d["n_heads"] * d["head_dim"], d["n_kv"] * d["head_dim"]
            return [(_get(attn, self.qkv), torch.cat([q_rows, q_len + kv_rows, q_len + kv_len + kv_rows]))]
        return [(_get(attn, self.q), q_rows), (_get(attn, self.k), kv_rows), (_get(attn, self.v), kv_rows)]

    def head_norm_rows(self, attn: nn.Module, d: dict[str, int], q_heads: list[int],
                       kv_heads: list[int]) -> list[tuple[nn.Module, torch.Tensor]]:
        """(q/k norm, kept rows of its weight) for every attention norm whose weight spans heads.

        A weight ``[n * head_dim]`` (OLMo 2) keeps the kept heads' ``head_dim`` slices, one ``[n, head_dim]``
        (Cohere) keeps rows; one ``[head_dim]`` is shared by all heads (Gemma 3, Qwen 3) and stays.
        """
        hd, out = d["head_dim"], []
        for name, keep, n in zip(self.head_norms or (), (q_heads, kv_heads), (d["n_heads"], d["n_kv"])):
            norm = getattr(attn, name, None)  # Cohere builds them only with use_qk_norm
            w = getattr(norm, "weight", None)
            if w is None or (w.dim() == 1 and w.shape[0] == hd):
                continue
            if w.dim() == 2 and w.shape[0] == n:
                out.append((norm, torch.tensor(keep, dtype=torch.long)))
            elif w.dim() == 1 and w.shape[0] == n * hd:
                out.append((norm, torch.tensor([h * hd + j for h in keep for j in range(hd)], dtype=torch.long)))
            else:
                raise AmpPruneError(f"{type(attn).__name__}.{name} has weight shape {tuple(w.shape)}, which does not "
                                    f"follow {n} heads of {hd}; please report it")
        return out

    def gate_up_rows(self, mlp: nn.Module, d: dict[str, int],
                     channels: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
        """(projection, output rows to keep) for gate and up, given the kept channels."""
        if self.gate_up:
            return [(_get(mlp, self.gate_up), torch.cat([channels, d["intermediate"] + channels]))]
        return [(_get(mlp, self.gate), channels), (_get(mlp, self.up), channels)]

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

    def set_width(self, config, n_heads: int, n_kv: int, head_dim: int, intermediate: int) -> None:
        """Write the per-block shape into ``config`` (``head_dim`` explicitly: it no longer follows from hidden)."""
        setattr(config, self.n_heads_field, n_heads)
        setattr(config, self.n_kv_field, n_kv)
        setattr(config, self.head_dim_field, head_dim)
        setattr(config, self.inter_field, intermediate)

    def keep_blocks(self, model: nn.Module, kept: list[int]) -> None:
        """Keep only blocks ``kept`` (current indexing, ascending) and update every per-block fact together.

        That is the ``ModuleList``, each block's and attention's ``layer_idx`` (the KV cache is indexed by it),
        the per-layer config lists (``layer_types``; transformers 5 validates their length) and
        ``num_hidden_layers``. Called by surgery only.
        """
        layers = self.get_layers(model)
        old_n = len(layers)
        new = nn.ModuleList([layers[i] for i in kept])
        parent, _, attr = self.layers.rpartition(".")
        setattr(_get(model, parent) if parent else model, attr, new)
        for j, layer in enumerate(new):
            attn = self.attention(layer)
            if "layer_idx" not in vars(attn):
                raise AmpPruneError(f"{type(attn).__name__} has no layer_idx; block removal cannot renumber the KV "
                                    "cache of this transformers version; please report it")
            attn.layer_idx = j
            if "layer_idx" in vars(layer):  # some families keep a copy on the block too
                layer.layer_idx = j
        cfg = model.config
        for name in self.per_layer_fields:
            value = getattr(cfg, name, None)
            if isinstance(value, list) and len(value) == old_n:
                setattr(cfg, name, [value[i] for i in kept])
        setattr(cfg, self.n_layers_field, len(new))


def _get(root: nn.Module, dotted: str) -> nn.Module:
    """``root.a.b.c`` for ``dotted = "a.b.c"``, or a one-line error naming the missing attribute."""
    mod = root
    for part in dotted.split("."):
        try:
            mod = getattr(mod, part)
        except AttributeError:
            raise AmpPruneError(f"{type(root).__name__} has no '{dotted}' ('{part}' is missing): the model does not "
                                "have the layout its architecture spec expects; please report it") from None
    return mod
