"""Budget + scores -> :class:`PrunePlan`, a JSON-able record that replays on a fresh model.

Budget (the AMP reference): remove ``ratio`` of *all* model parameters (embeddings
included in the denominator), spread uniformly over the blocks. Every block loses the same
number of attention units (whole KV groups, or query heads evenly within each group) and
the same number of MLP channels, so the result is expressible by one HF config. The
attention share is the nearest whole unit count to the uniform share ``p`` of the block
parameters; the channel count then absorbs the rest of the budget exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.criteria.base import LayerScores
from amp_prune.errors import AmpPruneError

GQA_MODES = ("group", "heads")
PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """Units removed from one block, in the original indexing of that block."""

    layer: int
    heads: list[int] = field(default_factory=list)  # query heads removed
    kv_heads: list[int] = field(default_factory=list)  # KV heads removed (group mode)
    channels: list[int] = field(default_factory=list)  # MLP channels removed


@dataclass
class PrunePlan:
    """Everything :func:`amp_prune.surgery.apply_plan` needs, plus how it was chosen."""

    model_type: str
    dims: dict[str, int]  # hidden, n_heads, n_kv, head_dim, intermediate, n_layers before pruning
    gqa_mode: str
    criterion: str
    target_ratio: float
    layers: list[LayerPlan]
    removed_layers: list[int] = field(default_factory=list)  # whole blocks (depth pruning), original indexing
    method: str = "width"  # width | cka | hybrid
    steps: list[dict] = field(default_factory=list)  # the search log of depth/hybrid runs
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        if d.get("version") != PLAN_VERSION:
            raise AmpPruneError(f"pruning plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        d = dict(d)
        d["layers"] = [LayerPlan(**lp) for lp in d["layers"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise AmpPruneError(f"cannot read pruning plan {path}: {e}") from None


@dataclass
class Budget:
    """Per-block removal counts. ``attn_units`` is KV groups (group mode) or heads per group (heads mode)."""

    attn_units: int
    channels: int
    expected_removed: int
    total_params: int


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def _unit_costs(model: nn.Module, spec: ArchSpec, mode: str) -> tuple[int, int, int]:
    """Return (params per attention unit, attention units per block, params per channel)."""
    d = spec.dims(model.config)
    layer = spec.get_layers(model)[0]
    attn, mlp = spec.attention(layer), spec.mlp_module(layer)
    hidden, hd, g = d["hidden"], d["head_dim"], d["n_heads"] // d["n_kv"]
    qkv_bias = (getattr(attn, spec.qkv) if spec.qkv else getattr(attn, spec.q)).bias is not None
    row = hidden + (1 if qkv_bias else 0)
    head_cost = hd * row + hd * hidden  # q rows + o_proj columns
    if mode == "group":
        unit, n_units = g * head_cost + 2 * hd * row, d["n_kv"]
    else:
        unit, n_units = d["n_kv"] * head_cost, g  # one head from every group
    up = getattr(mlp, spec.gate_up) if spec.gate_up else getattr(mlp, spec.up)
    chan = 2 * (hidden + (1 if up.bias is not None else 0)) + hidden
    return unit, n_units, chan


def effective_mode(model: nn.Module, spec: ArchSpec, mode: str) -> str:
    """Heads mode needs groups of >= 2 query heads; MHA (one head per group) uses group mode."""
    if mode not in GQA_MODES:
        raise AmpPruneError(f"unknown GQA mode '{mode}': choose one of {', '.join(GQA_MODES)}")
    d = spec.dims(model.config)
    return "group" if d["n_heads"] == d["n_kv"] else mode


def compute_budget(model: nn.Module, spec: ArchSpec, ratio: float, mode: str) -> Budget:
    """Per-block counts that remove about ``ratio`` of all parameters."""
    d = spec.dims(model.config)
    total = count_params(model)
    unit, n_units, chan = _unit_costs(model, spec, mode)
    n_layers = d["n_layers"]
    target = ratio * total
    prunable = n_layers * ((n_units - 1) * unit + (d["intermediate"] - 1) * chan)
    if target > prunable:
        raise AmpPruneError(f"ratio {ratio} asks for {target / 1e6:.1f}M parameters but the blocks can give at most "
                            f"{prunable / 1e6:.1f}M ({prunable / total:.2f} of the model); lower --ratio")
    p = target / (n_layers * (n_units * unit + d["intermediate"] * chan))  # uniform share of every unit type
    best: tuple | None = None
    for k in {min(math.floor(p * n_units), n_units - 1), min(math.ceil(p * n_units), n_units - 1)}:
        m = min(max(round((target - n_layers * k * unit) / (n_layers * chan)), 0), d["intermediate"] - 1)
        err = abs(n_layers * (k * unit + m * chan) - target)
        key = (err > 0.005 * total, abs(k - p * n_units), err)  # on budget first, then closest to uniform
        if best is None or key < best[0]:
            best = (key, k, m)
    _, k, m = best
    return Budget(attn_units=k, channels=m, expected_removed=n_layers * (k * unit + m * chan), total_params=total)


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores (stable: ties go to the lower index)."""
    if k <= 0:
        return []
    order = torch.sort(scores.float(), stable=True).indices
    return sorted(order[:k].tolist())


def make_plan(model: nn.Module, spec: ArchSpec, scores: list[LayerScores], budget: Budget, *, mode: str,
              criterion: str, ratio: float) -> PrunePlan:
    """Pick the lowest-scoring units of every block according to ``budget``."""
    d = spec.dims(model.config)
    g = d["n_heads"] // d["n_kv"]
    layers = []
    for i, s in enumerate(scores):
        lp = LayerPlan(layer=i, channels=_lowest(s.channels, budget.channels))
        if mode == "group":
            group_scores = s.heads.view(d["n_kv"], g).sum(1)  # [n_kv]
            lp.kv_heads = _lowest(group_scores, budget.attn_units)
            lp.heads = sorted(h for kv in lp.kv_heads for h in range(kv * g, (kv + 1) * g))
        else:
            per_group = s.heads.view(d["n_kv"], g)
            lp.heads = sorted(kv * g + j for kv in range(d["n_kv"]) for j in _lowest(per_group[kv], budget.attn_units))
        layers.append(lp)
    return PrunePlan(model_type=model.config.model_type, dims=d, gqa_mode=mode, criterion=criterion,
                     target_ratio=ratio, layers=layers)
