"""Magnitude baseline: the L2 norm of each unit's own weights (no data needed).

Head ``h``: the norm of its query rows and its ``o_proj`` columns (K/V rows are shared
within a GQA group and so are left out). Channel ``j``: the norm of gate row ``j``, up row
``j`` and down column ``j``.
"""

from __future__ import annotations

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.placement import materialized
from amp_prune.width.criteria.base import LayerScores, ScoreContext


@torch.no_grad()
def magnitude_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    """``[n_heads]`` and ``[intermediate]`` weight norms per block; ``batches`` is unused."""
    d = spec.dims(model.config)
    nh, hd = d["n_heads"], d["head_dim"]
    out = []
    for layer in spec.get_layers(model):
        with materialized(layer):  # weights kept on disk (--offload disk) are read once here
            attn, mlp = spec.attention(layer), spec.mlp_module(layer)
            q_w, o_w = spec.query_weight(attn, d), spec.o_proj(layer).weight
            q_sq = q_w.float().pow(2).view(nh, hd, -1).sum(dim=(1, 2))
            o_sq = o_w.float().pow(2).view(o_w.shape[0], nh, hd).sum(dim=(0, 2))
            gate_w, up_w = spec.gate_up_weights(mlp, d)
            rows = gate_w.float().pow(2).sum(1) + up_w.float().pow(2).sum(1)
            cols = spec.down_proj(layer).weight.float().pow(2).sum(0)
        out.append(LayerScores(heads=(q_sq + o_sq).sqrt().cpu(), channels=(rows + cols).sqrt().cpu()))
    return out
