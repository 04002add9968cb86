"""Types shared by the criteria, and the block-by-block scoring loop of the data-driven ones."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import MaskRef, capture_inputs, run_blocks
from amp_prune.calib.data import Batch
from amp_prune.placement import materialized


@dataclass
class LayerScores:
    """Importance of the units of one block: ``heads`` ``[n_heads]``, ``channels`` ``[intermediate]`` (fp32, CPU)."""

    heads: torch.Tensor
    channels: torch.Tensor


@dataclass
class ScoreContext:
    """Where and how to score."""

    device: torch.device
    seed: int = 0
    progress: bool = True


class BlockScorer(Protocol):
    """A criterion that scores block ``i`` from what enters its projections while block ``i`` runs."""

    def hooks(self, i: int, layer: nn.Module, ref: MaskRef) -> contextlib.AbstractContextManager:
        """Hooks active while block ``i`` runs over every batch (``ref.mask``: the batch's ``[B, T]`` token mask)."""

    def finish(self, i: int, layer: nn.Module) -> LayerScores:
        """Block ``i``'s scores, once every batch has run through it."""


class FixedScores:
    """A :class:`BlockScorer` for scores known before any forward pass (magnitude, random)."""

    def __init__(self, scores: list[LayerScores]):
        self.scores = scores

    def hooks(self, i: int, layer: nn.Module, ref: MaskRef) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def finish(self, i: int, layer: nn.Module) -> LayerScores:
        return self.scores[i]


@torch.no_grad()
def score_blockwise(model: nn.Module, spec: ArchSpec, batches: list[Batch], scorer: BlockScorer, ctx: ScoreContext,
                    desc: str) -> list[LayerScores]:
    """Run every batch through the model block by block with ``scorer``'s hooks; one :class:`LayerScores` per block."""
    inputs = capture_inputs(model, spec, batches, ctx.device, progress=ctx.progress)
    run_blocks(model, spec, inputs, ctx.device, layer_context=scorer.hooks, progress=ctx.progress, desc=desc)
    out = []
    for i, layer in enumerate(spec.get_layers(model)):
        with materialized(layer, ctx.device):  # a scorer may read the weights (a no-op unless --offload disk)
            out.append(scorer.finish(i, layer))
    return out
