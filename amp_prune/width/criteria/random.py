"""Random baseline: seeded uniform scores, for ablations."""

from __future__ import annotations

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.width.criteria.base import LayerScores, ScoreContext


def random_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    """Uniform ``[0, 1)`` scores from a generator seeded with ``ctx.seed``; same seed, same scores."""
    d = spec.dims(model.config)
    gen = torch.Generator().manual_seed(ctx.seed)
    return [LayerScores(heads=torch.rand(d["n_heads"], generator=gen), channels=torch.rand(d["intermediate"], generator=gen))
            for _ in range(d["n_layers"])]
