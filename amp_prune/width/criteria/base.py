"""Types shared by the criteria."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
