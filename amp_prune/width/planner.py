"""Scores + budget -> a width :class:`PrunePlan` (the lowest-scoring units of every block)."""

from __future__ import annotations

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.plan import LayerPlan, PrunePlan
from amp_prune.width.budget import Budget, compute_budget
from amp_prune.width.criteria import LayerScores, ScoreContext, get_criterion


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores (stable: ties go to the lower index)."""
    if k <= 0:
        return []
    order = torch.sort(scores.float(), stable=True).indices
    return sorted(order[:k].tolist())


def make_plan(model: nn.Module, spec: ArchSpec, scores: list[LayerScores], budget: Budget, *, mode: str,
              criterion: str, ratio: float) -> PrunePlan:
    """Pick the lowest-scoring units of every block according to ``budget``.

    Group mode ranks a KV group by the sum of its query heads' scores ``[n_kv, g].sum(1)``;
    heads mode removes the ``budget.attn_units`` lowest heads inside every group.
    """
    d = spec.dims(model.config)
    g = d["n_heads"] // d["n_kv"]
    layers = []
    for i, s in enumerate(scores):
        lp = LayerPlan(layer=i, channels=lowest(s.channels, budget.channels))
        per_group = s.heads.view(d["n_kv"], g)  # [n_kv, g]
        if mode == "group":
            lp.kv_heads = lowest(per_group.sum(1), budget.attn_units)
            lp.heads = sorted(h for kv in lp.kv_heads for h in range(kv * g, (kv + 1) * g))
        else:
            lp.heads = sorted(kv * g + j for kv in range(d["n_kv"]) for j in lowest(per_group[kv], budget.attn_units))
        layers.append(lp)
    return PrunePlan(model_type=model.config.model_type, dims=d, gqa_mode=mode, criterion=criterion,
                     target_ratio=ratio, layers=layers)


def plan_width(model: nn.Module, spec: ArchSpec, batches: list[Batch], *, ratio: float, mode: str, criterion: str,
               ctx: ScoreContext) -> PrunePlan:
    """Score every unit with ``criterion`` and plan the removal of ``ratio`` of all parameters; ``model`` is untouched."""
    budget = compute_budget(model, spec, ratio, mode)
    scores = get_criterion(criterion)(model, spec, batches, ctx)
    return make_plan(model, spec, scores, budget, mode=mode, criterion=criterion, ratio=ratio)
