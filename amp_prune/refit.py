"""The refit stage: the weights a plan needs beyond removals, computed from the dense model.

* width refit (``plan.refit`` onepass or sequential): the kept ``o_proj`` / ``down_proj``
  columns of every kept block, by :func:`amp_prune.width.sweep.sweep` with the plan's removals;
* stand-ins (``plan.standin``): per dropped span (:mod:`amp_prune.depth.standin`), the previous
  block's (refit) ``down_proj`` refit over its kept inputs (``plan.standin_form`` down), or a map
  ``T`` folded into it (map): ``W_down <- T^T W_down``.

A run and a replay of its plan call the same function with the same calibration settings
(``plan.calibration``), so both give the same model. Nothing here mutates the model: the weights
go to :func:`amp_prune.surgery.apply_plan`. The plan's ``standin_fit`` records what each span's
stand-in used (its damping, or none), as a record only: a replay recomputes it the same way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.depth.standin import fit_standins, spans
from amp_prune.io.offload import materialized
from amp_prune.plan import PrunePlan
from amp_prune.width.sweep import Candidate, kept_columns, sweep

Weights = dict[int, dict[str, torch.Tensor]]
REFIT_TOKENS_PER_INPUT = 4  # below this many calibration tokens per down_proj input, the refit overfitted
log = logging.getLogger(__name__)


def refit_token_notes(dims: dict[str, int], tokens: int) -> list[str]:
    """A warning (logged, and returned for the run's notes) when a width refit has too few calibration tokens.

    Measured on SmolLM2 (1536 ``down_proj`` inputs): 1,952 tokens made a 15.8% hybrid worse (98 -> 140
    WikiText-2 ppl), 22,177 made it better (98 -> 85); see docs/results.md.
    """
    need = REFIT_TOKENS_PER_INPUT * dims["intermediate"]
    if tokens >= need:
        return []
    msg = (f"the refit fits {dims['intermediate']} down_proj inputs from {tokens} calibration tokens; below {need} "
           f"({REFIT_TOKENS_PER_INPUT} per input) it can overfit and do worse than no refit: raise --num-samples / "
           "--seq-len, or pass --refit none")
    log.warning(msg)
    return [msg]


def compute_weights(model: nn.Module, spec: ArchSpec, plan: PrunePlan, batches: list[Batch], device: torch.device, *,
                    progress: bool = True) -> Weights:
    """Per-block replacement weights for ``plan`` on the dense ``model`` (see module docstring)."""
    d = spec.dims(model.config)
    weights: Weights = {}
    if plan.refit != "none" and any(lp.heads or lp.channels for lp in plan.layers):
        cand = Candidate(budget=None, layers=plan.layers, removed=set(plan.removed_layers))
        sweep(model, spec, batches, [cand], mode=plan.gqa_mode, scorer=None, refit=plan.refit, damp=plan.damp,
              device=device, compare=False, progress=progress, desc=f"refit ({plan.refit})")
        weights = {i: w for i, w in cand.weights.items() if i not in plan.removed_layers}
    if plan.standin and plan.removed_layers:
        layers = spec.get_layers(model)
        bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block a-1 -> kept down_proj columns, their weights
        for a, _ in spans(plan.removed_layers):
            if a >= 1:
                _, cols = kept_columns(plan.layers[a - 1], d)
                base = weights.get(a - 1, {}).get("down")
                if base is None:
                    with materialized(layers[a - 1]):  # a no-op unless the blocks are kept on disk
                        base = spec.down_proj(layers[a - 1]).weight.detach()[:, cols].cpu()
                bases[a - 1] = (cols, base)
        fits = fit_standins(model, spec, batches, plan.removed_layers, device, damp=plan.standin_ridge,
                            form=plan.standin_form, bases=bases, progress=progress)
        plan.standin_fit = [f.record() for f in fits.values()]
        for k, fit in fits.items():
            if fit.x is None:  # plain dropping beat every damping on held-out tokens
                continue
            down = spec.down_proj(layers[k])
            dtype = bases[k][1].dtype
            w = weights.setdefault(k, {})
            if fit.form == "down":  # the fitted weights replace the kept ones
                w["down"] = fit.x.T.contiguous().to(dtype)
                continue
            w["down"] = (fit.x.T @ bases[k][1].double()).to(dtype)  # W_down <- T^T W_down
            if down.bias is not None:
                with materialized(layers[k]):
                    w["down_bias"] = (fit.x.T @ down.bias.detach().double().cpu()).to(down.bias.dtype)
    return weights
