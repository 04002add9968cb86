"""Apply a plan: the only code that mutates a model (width units and whole blocks).

Query head ``h`` owns rows ``h*hd:(h+1)*hd`` of ``q_proj`` and the same columns of ``o_proj``;
KV head ``g`` owns rows of ``k_proj``/``v_proj``. In GQA, query head ``h`` reads KV head
``h // (n_heads / n_kv)``, so a plan keeps the same number of query heads in every kept
group. MLP channel ``j`` owns gate/up row ``j`` and down column ``j``. Weights, module
attributes and ``model.config`` change together; a module that lacks an attribute the
family spec names is an error, never skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from amp_prune.arch import ArchSpec, get_spec
from amp_prune.errors import AmpPruneError
from amp_prune.io.offload import device_map_after_surgery, keep_on_disk
from amp_prune.placement import detach, is_offloaded, offload_home
from amp_prune.plan import LayerPlan, PrunePlan, kept


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


def _set_attrs(module: nn.Module, names: tuple[str, ...], values: dict[str, int]) -> None:
    """Update the shape attributes a module caches; a missing one means the spec is stale for this version."""
    for name in names:
        if name not in vars(module):
            raise AmpPruneError(f"{type(module).__name__} has no attribute '{name}' that amp-prune must update; "
                                "this transformers version is not supported yet, please report it")
        setattr(module, name, values[name])


def _set_weight(lin: nn.Linear, w: torch.Tensor | None, what: str) -> None:
    """Replace ``lin``'s (already shrunk) weight by the refit ``w`` of the same shape."""
    if w is None:
        return
    if tuple(w.shape) != tuple(lin.weight.shape):
        raise AmpPruneError(f"refit {what} has shape {tuple(w.shape)}, the pruned projection {tuple(lin.weight.shape)}; "
                            "the weights do not belong to this plan")
    lin.weight = nn.Parameter(w.to(lin.weight.device, lin.weight.dtype).contiguous(),
                              requires_grad=lin.weight.requires_grad)


def prune_block(layer: nn.Module, spec: ArchSpec, lp: LayerPlan, d: dict[str, int],
                weights: dict[str, torch.Tensor] | None = None) -> None:
    """Remove the heads, KV heads and channels of ``lp`` from one block (original dims ``d``).

    ``weights`` may hold refit ``o`` ``[hidden, kept q rows]`` and ``down`` ``[hidden, kept channels]`` (and a
    ``down_bias``) that replace the kept columns once the block is shrunk.
    """
    hd = d["head_dim"]
    kept_heads, kept_kv = kept(d["n_heads"], lp.heads), kept(d["n_kv"], lp.kv_heads)
    kept_ch = torch.tensor(kept(d["intermediate"], lp.channels), dtype=torch.long)
    q_rows = _rows(kept_heads, hd)
    attn, mlp = spec.attention(layer), spec.mlp_module(layer)
    for lin, rows in spec.qkv_rows(attn, d, q_rows, _rows(kept_kv, hd)):
        shrink_linear(lin, keep_out=rows)
    shrink_linear(spec.o_proj(layer), keep_in=q_rows)
    for norm, rows in spec.head_norm_rows(attn, d, kept_heads, kept_kv):  # q/k norms spanning heads (OLMo 2, Cohere)
        norm.weight = nn.Parameter(norm.weight.index_select(0, rows.to(norm.weight.device)).contiguous(),
                                   requires_grad=norm.weight.requires_grad)
    n_q, n_kv = len(kept_heads), len(kept_kv)
    _set_attrs(attn, spec.attn_attrs, {"num_key_value_groups": n_q // n_kv, "num_key_value_heads": n_kv, "head_dim": hd})
    for lin, rows in spec.gate_up_rows(mlp, d, kept_ch):
        shrink_linear(lin, keep_out=rows)
    shrink_linear(spec.down_proj(layer), keep_in=kept_ch)
    _set_attrs(mlp, spec.mlp_attrs, {"intermediate_size": len(kept_ch)})
    weights = weights or {}
    _set_weight(spec.o_proj(layer), weights.get("o"), f"o_proj of block {lp.layer}")
    _set_weight(spec.down_proj(layer), weights.get("down"), f"down_proj of block {lp.layer}")
    if "down_bias" in weights:
        spec.down_proj(layer).bias = nn.Parameter(weights["down_bias"].to(spec.down_proj(layer).weight))


def remove_blocks(model: nn.Module, spec: ArchSpec, blocks: list[int]) -> None:
    """Drop blocks (current indexing); ``num_hidden_layers``, ``layer_idx`` and per-layer lists follow."""
    n = len(spec.get_layers(model))
    gone = set(blocks)
    if any(not 0 <= b < n for b in gone):
        raise AmpPruneError(f"cannot drop blocks {sorted(gone)} from a model with {n}")
    if len(gone) >= n:
        raise AmpPruneError("cannot drop every block")
    spec.keep_blocks(model, kept(n, sorted(gone)))


def apply_plan(model: nn.Module, plan: PrunePlan, spec: ArchSpec | None = None,
               weights: dict[int, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Physically remove what ``plan`` lists from ``model`` (in place) and update its config.

    Width removals are applied to every kept block, then the blocks in ``plan.removed_layers``
    are dropped. The model must have the family and shape the plan was made for
    (:meth:`PrunePlan.check`), and every kept block ends with the same head, KV-head and
    channel counts (one HF config describes them all). A plan with a refit or a stand-in also
    needs its weights (``weights``, else ``plan.weights``): they are computed from calibration
    data, which ``prune(... plan=FILE)`` and ``amp-prune MODEL --plan FILE`` do.

    A model whose blocks are kept on disk (``--offload disk``) stays so: each block that changes is
    read once, shrunk and written back (:mod:`amp_prune.io.offload`), one block in memory at a time.
    """
    spec = spec or get_spec(model.config.model_type)
    d = spec.dims(model.config)
    n_q, n_kv, inter = plan.check(model.config.model_type, d)
    weights = weights if weights is not None else plan.weights
    if plan.needs_weights and weights is None:
        raise AmpPruneError(f"this plan was made with refit={plan.refit}, stand-in={plan.standin}: applying it needs "
                            "weights computed from calibration data; replay it with `amp-prune MODEL --plan FILE`")
    dropped = set(plan.removed_layers)
    layers = spec.get_layers(model)
    offloaded = is_offloaded(model)
    for lp in plan.layers:
        w = (weights or {}).get(lp.layer)
        if lp.layer not in dropped and (lp.heads or lp.kv_heads or lp.channels or w):
            home = offload_home(layers[lp.layer])
            if home is not None:  # --offload disk: read this block once, shrink it, write it back to disk
                detach(layers[lp.layer])
            prune_block(layers[lp.layer], spec, lp, d, w)
            if home is not None:
                keep_on_disk(model, layers[lp.layer], home)
    spec.set_width(model.config, n_q, n_kv, d["head_dim"], inter)
    if dropped:
        remove_blocks(model, spec, sorted(dropped))
    if offloaded:
        model.hf_device_map = device_map_after_surgery(model, spec)
    return model
