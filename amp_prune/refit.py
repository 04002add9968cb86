"""The refit stage: the weights a plan needs beyond removals, computed from the dense model.

* width refit (``plan.refit`` onepass or sequential): the kept ``o_proj`` / ``down_proj``
  columns of every kept block, by :func:`amp_prune.width.sweep.sweep` with the plan's removals;
* stand-ins (``plan.standin``): per dropped span (:mod:`amp_prune.depth.standin`), the previous
  block's (refit) ``down_proj`` refit over its kept inputs (``plan.standin_form`` down), or a map
  ``T`` folded into it (map): ``W_down <- T^T W_down``.

With ``plan.standin_check`` (plans made since 2026-12-04), a span's stand-in is kept only where
it brings the whole pruned model's next-token distribution closer to the dense model's (mean KL
on the first ``PROXY_TOKENS`` calibration positions) than plain dropping does
(:func:`check_standins`): the fit minimizes the squared error of the residual stream, and on
SmolLM2 some spans that it fits well get far worse on text (blocks 8-13: WikiText-2 325 plain,
3,475 with the map, 3,972 with the down form; docs/results.md).

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
from amp_prune.calib.blockwise import capture_inputs, run_blocks
from amp_prune.calib.data import Batch, leading_rows
from amp_prune.depth.standin import fit_standins, spans
from amp_prune.placement import materialized
from amp_prune.plan import PrunePlan
from amp_prune.width.sweep import PROXY_TOKENS, Candidate, calib_kl, kept_columns, substituted, sweep

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
        # block k's weights without its stand-in (a copy: the stand-in is written into the same dict)
        before = {k: dict(weights[k]) if k in weights else None for k, fit in fits.items() if fit.x is not None}
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
        if plan.standin_check:
            check_standins(model, spec, plan, weights, before, batches, device)
    return weights


@torch.no_grad()
def check_standins(model: nn.Module, spec: ArchSpec, plan: PrunePlan, weights: Weights,
                   before: dict[int, dict[str, torch.Tensor] | None], batches: list[Batch], device: torch.device) -> None:
    """Drop each stand-in that does not bring the pruned model closer to the dense one (in place, greedy, in order).

    For the span fitted into block ``k`` the pruned model (width removals, refit and earlier spans as
    decided, later spans plainly dropped) runs on the first ``PROXY_TOKENS`` calibration positions from
    the states entering block ``k``, once with ``k``'s stand-in and once with ``before[k]``; the lower
    mean ``KL(p_dense || p_pruned)`` of the next-token distributions decides (a stand-in must win
    strictly). ``plan.standin_fit`` records both divergences (``calib_kl``) and the outcome (``kept``).
    """
    d = spec.dims(model.config)
    batches = leading_rows(batches, PROXY_TOKENS)
    dropped = set(plan.removed_layers)
    records = {r["span"][0] - 1: r for r in plan.standin_fit}
    todo = sorted(before)
    if not todo:
        return
    trial: Weights = {i: w for i, w in weights.items() if i not in todo}  # later spans: plain dropping
    trial.update({k: before[k] for k in todo if before[k] is not None})

    def ctx(i: int, layer: nn.Module, _ref):
        return substituted(layer, spec, plan.layers[i], d, trial.get(i) or {})

    states, at = capture_inputs(model, spec, batches, device), 0
    dense = run_blocks(model, spec, states, device, progress=False)  # the reference distributions
    for k in todo:  # advance to block k with what is decided so far, then try k with and without its stand-in
        ahead = dropped | set(range(k, d["n_layers"]))
        states = run_blocks(model, spec, states, device, layer_context=ctx, skip=ahead, start=at, progress=False)
        at, loss = k, {}
        for label, w in (("with", weights[k]), ("without", before[k])):
            trial[k] = w
            out = run_blocks(model, spec, states, device, layer_context=ctx, skip=dropped, start=k, progress=False)
            loss[label] = calib_kl(model, spec, dense, out, device)
        keep = loss["with"] < loss["without"]
        trial[k] = weights[k] if keep else before[k]
        if not keep:
            log.warning("stand-in for blocks %d-%d left out: it moved the model away from the dense one (calibration "
                        "KL %.4f without it, %.4f with it)", *records[k]["span"], loss["without"], loss["with"])
            if before[k] is None:
                del weights[k]
            else:
                weights[k] = before[k]
        records[k].update(calib_kl={k2: round(v, 5) for k2, v in loss.items()}, kept=keep)
