"""Wanda-sp-style structured baseline: ``|W| * ||X||`` summed over each unit's weights.

Wanda scores a single weight as ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the norm of
input feature ``j`` over the calibration tokens. The structured variant sums that score over
the weights a unit owns on the input side of the projection that reads it:

    head h:     sum_{i, d in h} |W_O[i, d]| * ||a_d||_2      (o_proj columns of the head)
    channel j:  sum_i |W_down[i, j]| * ||z_j||_2              (down_proj column j)

Real tokens only; the feature norms are accumulated in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import MaskRef, capture_inputs, run_blocks
from amp_prune.calib.data import Batch
from amp_prune.width.criteria.base import LayerScores, ScoreContext


@torch.no_grad()
def wanda_sp_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    dims = spec.dims(model.config)
    n_layers = len(spec.get_layers(model))
    sq_o: list[torch.Tensor | None] = [None] * n_layers
    sq_d: list[torch.Tensor | None] = [None] * n_layers

    def layer_context(i: int, layer: nn.Module, ref: MaskRef):
        def o_hook(_m, args):
            s = args[0][ref.mask].float().pow(2).sum(0)
            sq_o[i] = s if sq_o[i] is None else sq_o[i] + s

        def d_hook(_m, args):
            s = args[0][ref.mask].float().pow(2).sum(0)
            sq_d[i] = s if sq_d[i] is None else sq_d[i] + s

        stack = contextlib.ExitStack()
        stack.callback(spec.o_proj(layer).register_forward_pre_hook(o_hook).remove)
        stack.callback(spec.down_proj(layer).register_forward_pre_hook(d_hook).remove)
        return stack

    inputs = capture_inputs(model, spec, batches, ctx.device, progress=ctx.progress)
    run_blocks(model, spec, inputs, ctx.device, layer_context=layer_context, progress=ctx.progress,
               desc="Wanda-sp scoring")
    out = []
    for i, layer in enumerate(spec.get_layers(model)):
        w_o = spec.o_proj(layer).weight.float()
        w_d = spec.down_proj(layer).weight.float()
        per_col_o = (w_o.abs().to(sq_o[i].device) * sq_o[i].sqrt()).sum(0)  # [n_heads*head_dim]
        per_col_d = (w_d.abs().to(sq_d[i].device) * sq_d[i].sqrt()).sum(0)  # [intermediate]
        out.append(LayerScores(heads=per_col_o.view(dims["n_heads"], -1).sum(1).cpu(), channels=per_col_d.cpu()))
    return out
