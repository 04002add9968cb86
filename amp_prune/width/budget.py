"""The width budget: how many attention units and MLP channels every block loses.

Budget (the AMP reference): remove ``ratio`` of *all* model parameters (embeddings
included in the denominator; ``--ratio-of blocks`` converts a share of the decoder blocks into
this one before planning), spread uniformly over the blocks. Every block loses the same
number of attention units (whole KV groups, or query heads evenly within each group) and
the same number of MLP channels, so the result is expressible by one HF config. The
attention share is the nearest whole unit count to the uniform share ``p`` of the block
parameters; the channel count then absorbs the rest of the budget exactly:

    p = ratio * P_total / (L * (n_units * c_unit + I * c_channel))
    k in {floor(p * n_units), ceil(p * n_units)},  m = round((ratio * P_total - L * k * c_unit) / (L * c_channel))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.arch.native import expressible
from amp_prune.config import GQA_MODES
from amp_prune.errors import AmpPruneError


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


def unit_costs(model: nn.Module, spec: ArchSpec, mode: str) -> tuple[int, int, int]:
    """Return (params per attention unit, attention units per block, params per channel)."""
    d = spec.dims(model.config)
    layer = spec.get_layers(model)[0]
    hidden, hd, g = d["hidden"], d["head_dim"], d["n_heads"] // d["n_kv"]
    row = hidden + (1 if spec.qkv_has_bias(spec.attention(layer)) else 0)
    head_cost = hd * row + hd * hidden  # q rows + o_proj columns
    if mode == "group":
        unit, n_units = g * head_cost + 2 * hd * row, d["n_kv"]
    else:
        unit, n_units = d["n_kv"] * head_cost, g  # one head from every group
    chan = 2 * (hidden + (1 if spec.up_has_bias(spec.mlp_module(layer)) else 0)) + hidden
    return unit, n_units, chan


def attn_options(model: nn.Module, spec: ArchSpec, mode: str) -> list[int]:
    """The attention units per block (``0 .. n_units-1``) whose pruned shape a stock config and class can express.

    Group mode keeps ``n_kv - k`` groups of ``g`` heads, heads mode ``g - k`` heads in each of the ``n_kv``
    groups; :func:`amp_prune.arch.native.expressible` decides (Gemma 3 270M, 4 heads and 1 KV head: 0, 2
    or 3 heads removed, since 3 heads do not divide hidden 640).
    """
    d = spec.dims(model.config)
    g = d["n_heads"] // d["n_kv"]
    out = []
    for k in range(d["n_kv"] if mode == "group" else g):
        n_q, n_kv = ((d["n_kv"] - k) * g, d["n_kv"] - k) if mode == "group" else (d["n_kv"] * (g - k), d["n_kv"])
        if expressible(model.config, spec, n_q, n_kv):
            out.append(k)
    return out


def kept_heads_phrase(model: nn.Module, spec: ArchSpec, mode: str, options: list[int]) -> str:
    """``"4, 2 or 1 query heads per block"``: what ``options`` keep, for error messages."""
    d = spec.dims(model.config)
    g = d["n_heads"] // d["n_kv"]
    kept = [(d["n_kv"] - k) * g if mode == "group" else d["n_kv"] * (g - k) for k in options]
    words = [str(n) for n in kept]
    return (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]) + " query heads per block"


def effective_mode(model: nn.Module, spec: ArchSpec, mode: str) -> str:
    """The GQA mode that can act on this model's attention.

    Heads mode needs groups of >= 2 query heads, so MHA (one head per group) uses group mode; with one KV
    head (multi-query, Gemma 3 270M) group mode could remove no attention at all, so it uses heads mode,
    whose options include removing none.
    """
    if mode not in GQA_MODES:
        raise AmpPruneError(f"unknown GQA mode '{mode}': choose one of {', '.join(GQA_MODES)}")
    d = spec.dims(model.config)
    if d["n_heads"] == d["n_kv"]:
        return "group"
    return "heads" if d["n_kv"] == 1 else mode


def ceiling_phrase(model: nn.Module, spec: ArchSpec, most: float) -> str:
    """``most`` parameters as a share under both ``--ratio-of`` scopes, for infeasibility errors."""
    total, blocks = count_params(model), count_params(spec.get_layers(model))
    return (f"{most / 1e6:.1f}M ({most / total:.3f} of all parameters, --ratio-of all; {most / blocks:.3f} of the "
            f"decoder blocks', --ratio-of blocks)")


def compute_budget(model: nn.Module, spec: ArchSpec, ratio: float, mode: str) -> Budget:
    """Per-block counts that remove about ``ratio`` of all parameters; a one-line error if they cannot."""
    d = spec.dims(model.config)
    total = count_params(model)
    unit, n_units, chan = unit_costs(model, spec, mode)
    options = attn_options(model, spec, mode)
    n_layers = d["n_layers"]
    target = ratio * total
    prunable = n_layers * (max(options) * unit + (d["intermediate"] - 1) * chan)
    if target > prunable:
        raise AmpPruneError(f"ratio {ratio} asks for {target / 1e6:.1f}M parameters but the blocks can give at most "
                            f"{ceiling_phrase(model, spec, prunable)} in {mode} mode; lower --ratio")
    p = target / (n_layers * (n_units * unit + d["intermediate"] * chan))  # uniform share of every unit type
    near = {min(math.floor(p * n_units), n_units - 1), min(math.ceil(p * n_units), n_units - 1)} & set(options)
    best: tuple | None = None
    for k in near or sorted(options, key=lambda k: abs(k - p * n_units))[:2]:
        m = min(max(round((target - n_layers * k * unit) / (n_layers * chan)), 0), d["intermediate"] - 1)
        err = abs(n_layers * (k * unit + m * chan) - target)
        key = (err > 0.005 * total, abs(k - p * n_units), err)  # on budget first, then closest to uniform
        if best is None or key < best[0]:
            best = (key, k, m)
    _, k, m = best
    return Budget(attn_units=k, channels=m, expected_removed=n_layers * (k * unit + m * chan), total_params=total)
