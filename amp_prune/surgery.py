"""Apply a width plan: shrink weights, module attributes and ``model.config`` together.

Query head ``h`` owns rows ``h*hd:(h+1)*hd`` of ``q_proj`` and columns of ``o_proj``; KV
head ``g`` owns rows of ``k_proj``/``v_proj``. In GQA, query head ``h`` reads KV head
``h // (n_heads / n_kv)``, so a plan keeps the same number of query heads in every kept
group. MLP channel ``j`` owns gate/up row ``j`` and down column ``j``.
"""

from __future__ import annotations

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.errors import AmpPruneError
from amp_prune.plan import LayerPlan, PrunePlan


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Element indices of whole units of width ``size``."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units]) if units else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def shrink_linear(lin: nn.Linear, *, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> None:
    """Keep only rows ``keep_out`` and columns ``keep_in`` of ``lin`` (bias follows rows), in place."""
    w = lin.weight
    if keep_out is not None:
        w = w.index_select(0, keep_out.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, keep_out.to(w.device)).contiguous())
        lin.out_features = w.shape[0]
    if keep_in is not None:
        w = w.index_select(1, keep_in.to(w.device))
        lin.in_features = w.shape[1]
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)


def _keep(n: int, removed: list[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(n) if i not in gone]


def _check_layer(lp: LayerPlan, d: dict[str, int]) -> tuple[int, int, int]:
    g = d["n_heads"] // d["n_kv"]
    for name, idx, n in (("heads", lp.heads, d["n_heads"]), ("kv_heads", lp.kv_heads, d["n_kv"]),
                         ("channels", lp.channels, d["intermediate"])):
        if len(set(idx)) != len(idx) or any(not 0 <= i < n for i in idx):
            raise AmpPruneError(f"plan layer {lp.layer}: invalid {name} indices for a block with {n}")
    kept_heads = set(_keep(d["n_heads"], lp.heads))
    kept_kv = _keep(d["n_kv"], lp.kv_heads)
    per_group = {kv: sum(1 for h in kept_heads if h // g == kv) for kv in range(d["n_kv"])}
    if any(per_group[kv] for kv in lp.kv_heads):
        raise AmpPruneError(f"plan layer {lp.layer}: removes a KV head but keeps query heads that read it")
    counts = {per_group[kv] for kv in kept_kv}
    if len(counts) != 1 or 0 in counts:
        raise AmpPruneError(f"plan layer {lp.layer}: kept KV groups must keep the same number (>=1) of query heads")
    return len(kept_heads), len(kept_kv), d["intermediate"] - len(lp.channels)


def _prune_block(layer: nn.Module, spec: ArchSpec, lp: LayerPlan, d: dict[str, int]) -> None:
    hd = d["head_dim"]
    kept_heads = _keep(d["n_heads"], lp.heads)
    kept_kv = _keep(d["n_kv"], lp.kv_heads)
    kept_ch = torch.tensor(_keep(d["intermediate"], lp.channels), dtype=torch.long)
    q_rows, kv_rows = _rows(kept_heads, hd), _rows(kept_kv, hd)
    attn, mlp = spec.attention(layer), spec.mlp_module(layer)
    if spec.qkv:
        q_len, kv_len = d["n_heads"] * hd, d["n_kv"] * hd
        rows = torch.cat([q_rows, q_len + kv_rows, q_len + kv_len + kv_rows])
        shrink_linear(getattr(attn, spec.qkv), keep_out=rows)
    else:
        shrink_linear(getattr(attn, spec.q), keep_out=q_rows)
        shrink_linear(getattr(attn, spec.k), keep_out=kv_rows)
        shrink_linear(getattr(attn, spec.v), keep_out=kv_rows)
    shrink_linear(getattr(attn, spec.o), keep_in=q_rows)
    n_q, n_kv = len(kept_heads), len(kept_kv)
    for attr, value in (("num_key_value_groups", n_q // n_kv), ("num_heads", n_q), ("num_attention_heads", n_q),
                        ("num_key_value_heads", n_kv), ("head_dim", hd)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    if spec.gate_up:
        shrink_linear(getattr(mlp, spec.gate_up), keep_out=torch.cat([kept_ch, d["intermediate"] + kept_ch]))
    else:
        shrink_linear(getattr(mlp, spec.gate), keep_out=kept_ch)
        shrink_linear(getattr(mlp, spec.up), keep_out=kept_ch)
    shrink_linear(getattr(mlp, spec.down), keep_in=kept_ch)
    for attr in ("intermediate_size",):
        if hasattr(mlp, attr):
            setattr(mlp, attr, len(kept_ch))


def apply_plan(model: nn.Module, plan: PrunePlan, spec: ArchSpec | None = None) -> nn.Module:
    """Physically remove what ``plan`` lists from ``model`` (in place) and update its config.

    Width removals are applied to every kept block, then the blocks in ``plan.removed_layers``
    are dropped. The model must have the shape the plan was made for, and every kept block
    must end with the same head, KV-head and channel counts (one HF config describes them all).
    """
    from amp_prune.arch import get_spec
    from amp_prune.layer_drop import drop_blocks

    spec = spec or get_spec(model.config.model_type)
    d = spec.dims(model.config)
    if d != plan.dims:
        raise AmpPruneError(f"plan was made for a model with {plan.dims}, this model has {d}")
    if len(plan.layers) != d["n_layers"]:
        raise AmpPruneError(f"plan lists {len(plan.layers)} blocks, the model has {d['n_layers']}")
    dropped = set(plan.removed_layers)
    if any(not 0 <= b < d["n_layers"] for b in dropped) or len(dropped) >= d["n_layers"]:
        raise AmpPruneError(f"plan removes blocks {sorted(dropped)}; the model has {d['n_layers']}")
    kept = [lp for lp in plan.layers if lp.layer not in dropped]
    shapes = {_check_layer(lp, d) for lp in kept}
    if len(shapes) != 1:
        raise AmpPruneError(f"plan gives blocks different shapes {sorted(shapes)}; HF configs need uniform blocks")
    (n_q, n_kv, inter), = shapes
    layers = spec.get_layers(model)
    for lp in kept:
        _prune_block(layers[lp.layer], spec, lp, d)
    cfg = model.config
    setattr(cfg, spec.n_heads_field, n_q)
    setattr(cfg, spec.n_kv_field, n_kv)
    setattr(cfg, spec.head_dim_field, d["head_dim"])  # must be explicit once heads change
    setattr(cfg, spec.inter_field, inter)
    if dropped:
        drop_blocks(model, spec, sorted(dropped))
    return model
