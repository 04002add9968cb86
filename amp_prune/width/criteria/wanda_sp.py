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
from amp_prune.calib.blockwise import MaskRef
from amp_prune.calib.data import Batch
from amp_prune.width.criteria.base import LayerScores, ScoreContext, score_blockwise


class WandaSpScorer:
    """Accumulates the squared input norms of ``o_proj`` and ``down_proj`` of one block while it runs."""

    def __init__(self, spec: ArchSpec, n_heads: int):
        self.spec, self.n_heads = spec, n_heads
        self.sq: dict[tuple[int, str], torch.Tensor] = {}

    def hooks(self, i: int, layer: nn.Module, ref: MaskRef) -> contextlib.AbstractContextManager:
        def make(key):
            def hook(_m, args):
                s = args[0][ref.mask].float().pow(2).sum(0)
                self.sq[key] = s if key not in self.sq else self.sq[key] + s
            return hook

        stack = contextlib.ExitStack()
        stack.callback(self.spec.o_proj(layer).register_forward_pre_hook(make((i, "o"))).remove)
        stack.callback(self.spec.down_proj(layer).register_forward_pre_hook(make((i, "down"))).remove)
        return stack

    def finish(self, i: int, layer: nn.Module) -> LayerScores:
        sq_o, sq_d = self.sq.pop((i, "o")), self.sq.pop((i, "down"))
        w_o = self.spec.o_proj(layer).weight.float()
        w_d = self.spec.down_proj(layer).weight.float()
        per_col_o = (w_o.abs().to(sq_o.device) * sq_o.sqrt()).sum(0)  # [n_heads*head_dim]
        per_col_d = (w_d.abs().to(sq_d.device) * sq_d.sqrt()).sum(0)  # [intermediate]
        return LayerScores(heads=per_col_o.view(self.n_heads, -1).sum(1).cpu(), channels=per_col_d.cpu())


@torch.no_grad()
def wanda_sp_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    """Wanda-sp scores of every block, computed block by block (see module docstring)."""
    return score_blockwise(model, spec, batches, WandaSpScorer(spec, spec.dims(model.config)["n_heads"]), ctx,
                           desc="Wanda-sp scoring")
