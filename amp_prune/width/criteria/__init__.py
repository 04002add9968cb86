"""Scoring criteria. Each is pure: it reads the model and never mutates it.

A criterion is ``fn(model, spec, batches, ctx) -> list[LayerScores]``, one entry per block;
higher scores mean more important units.
"""

from __future__ import annotations

from collections.abc import Callable

from amp_prune.config import CRITERIA
from amp_prune.errors import AmpPruneError
from amp_prune.width.criteria.amp import AmpScorer, amp_scores
from amp_prune.width.criteria.base import BlockScorer, FixedScores, LayerScores, ScoreContext
from amp_prune.width.criteria.magnitude import magnitude_scores
from amp_prune.width.criteria.obs import ObsScorer, obs_scores
from amp_prune.width.criteria.random import random_scores
from amp_prune.width.criteria.wanda_sp import WandaSpScorer, wanda_sp_scores

SCORERS: dict[str, Callable] = {"amp": amp_scores, "magnitude": magnitude_scores, "obs": obs_scores,
                                "random": random_scores, "wanda_sp": wanda_sp_scores}


def block_scorer(name: str, model, spec, batches, ctx: ScoreContext) -> BlockScorer:
    """A :class:`BlockScorer` for ``name``: hooks for the data-driven criteria, fixed scores for the others."""
    d = spec.dims(model.config)
    n_heads = d["n_heads"]
    if name == "obs":
        return ObsScorer(spec, n_heads, d["head_dim"])
    if name == "amp":
        return AmpScorer(spec, n_heads)
    if name == "wanda_sp":
        return WandaSpScorer(spec, n_heads)
    return FixedScores(get_criterion(name)(model, spec, batches, ctx))


def get_criterion(name: str) -> Callable:
    """Return the scoring function called ``name``."""
    if name not in SCORERS:
        raise AmpPruneError(f"unknown criterion '{name}': choose one of {', '.join(CRITERIA)}")
    return SCORERS[name]


__all__ = ["SCORERS", "BlockScorer", "FixedScores", "LayerScores", "ScoreContext", "block_scorer", "get_criterion", "amp_scores", "magnitude_scores",
           "obs_scores", "random_scores", "wanda_sp_scores"]
