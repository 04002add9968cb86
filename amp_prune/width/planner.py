"""Scores + budget -> a width :class:`PrunePlan` (the lowest-scoring units of every block).

:func:`plan_width` also chooses the attention/MLP split. For ``k`` attention units removed
per block (``0 .. n_units-1``; KV groups in group mode, heads per group in heads mode), MLP
channels absorb the rest of the budget: ``m_k = round((r P - L k c_unit) / (L c_channel))``.
Every ``k`` whose ``m_k`` fits and lands within 0.5% of the model of the target is a
candidate; :mod:`amp_prune.width.sweep` refits each and keeps the lowest calibration loss.
"""

from __future__ import annotations

from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.errors import AmpPruneError
from amp_prune.plan import PrunePlan
from amp_prune.width.budget import Budget, attn_options, compute_budget, count_params, kept_heads_phrase, unit_costs
from amp_prune.width.criteria import LayerScores, ScoreContext, block_scorer
from amp_prune.width.sweep import Candidate, layer_plan, sweep


def make_plan(model: nn.Module, spec: ArchSpec, scores: list[LayerScores], budget: Budget, *, mode: str,
              criterion: str, ratio: float) -> PrunePlan:
    """Pick the lowest-scoring units of every block according to ``budget``.

    Group mode ranks a KV group by the sum of its query heads' scores ``[n_kv, g].sum(1)``;
    heads mode removes the ``budget.attn_units`` lowest heads inside every group.
    """
    d = spec.dims(model.config)
    layers = [layer_plan(i, s.heads, s.channels, budget, mode, d) for i, s in enumerate(scores)]
    return PrunePlan(model_type=model.config.model_type, dims=d, gqa_mode=mode, criterion=criterion,
                     target_ratio=ratio, layers=layers, attn_units=budget.attn_units)


def split_budgets(model: nn.Module, spec: ArchSpec, ratio: float, mode: str,
                  split: str | int = "auto") -> list[Budget]:
    """Every feasible attention/MLP split of ``ratio`` ("auto"), the uniform one, or the forced ``N``."""
    uniform = compute_budget(model, spec, ratio, mode)  # a one-line error when no split can meet the ratio
    if split == "uniform":
        return [uniform]
    forced = None if split == "auto" else int(split)
    d = spec.dims(model.config)
    total, n_layers = count_params(model), d["n_layers"]
    unit, n_units, chan = unit_costs(model, spec, mode)
    target = ratio * total
    out = []
    options = attn_options(model, spec, mode)
    for k in options:
        m = round((target - n_layers * k * unit) / (n_layers * chan))
        removed = n_layers * (k * unit + m * chan)
        if 0 <= m <= d["intermediate"] - 1 and abs(removed - target) <= 0.005 * total:
            out.append(Budget(attn_units=k, channels=m, expected_removed=removed, total_params=total))
    if forced is not None:
        if not any(b.attn_units == forced for b in out):
            what = "KV groups" if mode == "group" else "heads per group"
            why = "" if forced in options else (f" ({model.config.model_type} can keep only "
                                                f"{kept_heads_phrase(model, spec, mode, options)})")
            raise AmpPruneError(f"--attn-units {forced} cannot meet --ratio {ratio} with uniform blocks ({n_units} "
                                f"{what} per block){why}; feasible: {', '.join(str(b.attn_units) for b in out) or 'none'}")
        out = [b for b in out if b.attn_units == forced]
    if not out:
        raise AmpPruneError(f"ratio {ratio} cannot be met by uniform width pruning of this model; lower --ratio")
    return out


def plan_width(model: nn.Module, spec: ArchSpec, batches: list[Batch], *, ratio: float, mode: str, criterion: str,
               ctx: ScoreContext, attn_units: str | int = "auto", refit: str = "onepass",
               damp: float = 0.01) -> PrunePlan:
    """Score, choose the split, plan and refit in one block-by-block sweep; ``model`` is untouched.

    The refit weights ride along in ``plan.weights`` (in memory; a replay recomputes them).
    """
    budgets = split_budgets(model, spec, ratio, mode, attn_units)
    cands = [Candidate(budget=b) for b in budgets]
    sweep(model, spec, batches, cands, mode=mode, scorer=block_scorer(criterion, model, spec, batches, ctx),
          refit=refit, damp=damp, device=ctx.device, compare=len(cands) > 1, progress=ctx.progress,
          desc=f"{criterion} scoring" + (f", {len(cands)} splits" if len(cands) > 1 else ""))
    best = min(cands, key=lambda c: c.loss) if len(cands) > 1 else cands[0]
    plan = PrunePlan(model_type=model.config.model_type, dims=spec.dims(model.config), gqa_mode=mode,
                     criterion=criterion, target_ratio=ratio, layers=best.layers, attn_units=best.budget.attn_units,
                     refit=refit, damp=damp if refit != "none" else 0.0,
                     split=[{"attn_units": c.budget.attn_units, "channels": c.budget.channels,
                             "calib_loss": c.loss, "cka": c.cka, "chosen": c is best} for c in cands])
    plan.weights = best.weights if refit != "none" else None
    return plan
