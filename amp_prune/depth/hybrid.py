"""Hybrid width + depth pruning.

Each step builds two candidates of about equal cost from the current model:

- A (depth): skip the block whose removal keeps the final representation most similar
  (linear CKA) to the unpruned model's;
- B (width): an AMP width step, uniform over the remaining blocks, removing about one
  block's worth of parameters;

and keeps the candidate whose representation is more similar (CKA) to the current model,
its parent. It stops once the parameter budget is met; a last, exact width step fills any
remainder smaller than a block. Every removal is tracked in the original indexing, so the
result is one :class:`PrunePlan` (width plan + removed blocks) that replays on a fresh model.

The search never changes the caller's model. It works on one private copy, which it shrinks
step by step through :func:`apply_plan`; a candidate is scored on that copy through hooks that
compute ``o_proj`` / ``down_proj`` from the kept columns only (which computes exactly what
removing the units computes) and skip the dropped block, so no candidate copy is made.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import MaskRef
from amp_prune.calib.data import Batch
from amp_prune.depth.search import DepthSearch, announce_cache, choose
from amp_prune.errors import AmpPruneError
from amp_prune.plan import HybridStep, LayerPlan, PrunePlan
from amp_prune.refit import compute_weights
from amp_prune.surgery import apply_plan
from amp_prune.width.budget import compute_budget, count_params, effective_mode
from amp_prune.width.criteria import ScoreContext
from amp_prune.width.planner import plan_width
from amp_prune.width.sweep import substituted

log = logging.getLogger(__name__)


@dataclass
class _Tracker:
    """Original indices of what every original block still has."""

    orig_layers: list[int]
    heads: dict[int, list[int]]
    kv: dict[int, list[int]]
    channels: dict[int, list[int]]

    @classmethod
    def start(cls, d: dict[str, int]) -> _Tracker:
        n = d["n_layers"]
        return cls(list(range(n)), {i: list(range(d["n_heads"])) for i in range(n)},
                   {i: list(range(d["n_kv"])) for i in range(n)}, {i: list(range(d["intermediate"])) for i in range(n)})

    def width(self, plan: PrunePlan) -> None:
        for lp in plan.layers:
            o = self.orig_layers[lp.layer]
            for store, gone in ((self.heads, lp.heads), (self.kv, lp.kv_heads), (self.channels, lp.channels)):
                drop = set(gone)
                store[o] = [u for j, u in enumerate(store[o]) if j not in drop]

    def depth(self, current_index: int) -> int:
        return self.orig_layers.pop(current_index)

    def plan(self, d: dict[str, int], model_type: str, mode: str, ratio: float, steps: list[HybridStep]) -> PrunePlan:
        layers = []
        for o in range(d["n_layers"]):
            layers.append(LayerPlan(layer=o, heads=sorted(set(range(d["n_heads"])) - set(self.heads[o])),
                                    kv_heads=sorted(set(range(d["n_kv"])) - set(self.kv[o])),
                                    channels=sorted(set(range(d["intermediate"])) - set(self.channels[o]))))
        removed = sorted(set(range(d["n_layers"])) - set(self.orig_layers))
        return PrunePlan(model_type=model_type, dims=d, gqa_mode=mode, criterion="amp+cka", target_ratio=ratio,
                         layers=layers, removed_layers=removed, method="hybrid", steps=steps)


def _width_plan(model: nn.Module, spec: ArchSpec, batches: list[Batch], n_params: float, mode: str,
                ctx: ScoreContext, **opts) -> PrunePlan | None:
    """An AMP plan removing about ``n_params`` from ``model`` (split and refit as ``opts``); ``None`` if nothing fits."""
    ratio = n_params / count_params(model)
    try:
        if compute_budget(model, spec, ratio, mode).expected_removed == 0:
            return None
        return plan_width(model, spec, batches, ratio=ratio, mode=mode, criterion="amp", ctx=ctx, **opts)
    except AmpPruneError:
        return None


def candidate_representation(search: DepthSearch, plan: PrunePlan, weights: dict | None = None) -> list[torch.Tensor]:
    """Final representation of ``search.model`` as if ``plan`` (and its refit ``weights``) were applied.

    Head ``h`` contributes to the block output only through columns ``h*hd:(h+1)*hd`` of ``o_proj``,
    channel ``j`` only through column ``j`` of ``down_proj``: computing those projections from the kept
    columns alone (with the refit weights, when given) equals removing the units; blocks in
    ``plan.removed_layers`` are skipped.
    """
    d = search.spec.dims(search.model.config)
    weights = weights or {}

    def layer_context(i: int, layer: nn.Module, _ref: MaskRef):
        lp = plan.layers[i]
        if not (lp.heads or lp.channels or i in weights):
            return contextlib.nullcontext()
        return substituted(layer, search.spec, lp, d, weights.get(i, {}))

    saved = search.removed
    search.removed = saved | set(plan.removed_layers)
    try:
        cache = search.prefix_pass(layer_context=layer_context, keep=False)
    finally:
        search.removed = saved
    reps = search.represent(cache[max(cache)])
    cache.close()
    return reps


def _standin(work: nn.Module, spec: ArchSpec, plan: PrunePlan, batches: list[Batch], device: torch.device,
             damp: float | str, form: str) -> dict:
    """The stand-in weights of dropping the block of ``plan`` from the current model ``work``."""
    plan.standin, plan.standin_damp, plan.standin_form = True, damp, form
    return compute_weights(work, spec, plan, batches, device, progress=False)


def plan_hybrid(model: nn.Module, spec: ArchSpec, batches: list[Batch], ratio: float, *, device: torch.device,
                gqa_mode: str = "group", representation: str = "pooled", seed: int = 0, progress: bool = True,
                attn_units: str | int = "uniform", refit: str = "none", standin: bool = False,
                damp: float = 0.0, standin_damp: float | str = "auto", standin_form: str = "down",
                compare_refit: bool = False,
                search_batches: list[Batch] | None = None, cache: str = "device") -> PrunePlan:
    """Plan the removal of about ``ratio`` of ``model``'s parameters by width and depth steps; ``model`` is untouched.

    The returned plan records ``refit`` / ``standin``, and the pipeline computes those weights for the
    final plan from the dense model, as a replay does. With ``compare_refit``, both candidates of every
    step are also refit before their CKA is compared (the training-free analogue of the seed paper's
    brief fine-tuning of both), and the chosen one is applied to the private copy with its refit. On
    SmolLM2 that comparison favoured width at every step and the result was worse (146 against 98
    WikiText-2 ppl at 15.8%, docs/results.md), so by default the candidates are compared as they are.
    Width steps choose their attention/MLP split as ``attn_units`` says (see
    :func:`amp_prune.width.planner.plan_width`; without ``compare_refit`` its losses are unrefit too).
    Width candidates are scored on ``batches``; the CKA comparisons (and the depth candidates) run on
    ``search_batches`` (default: ``batches``), whose prefix cache is placed as ``cache`` says.
    """
    d0 = spec.dims(model.config)
    mode = effective_mode(model, spec, gqa_mode)
    total = count_params(model)
    target = ratio * total
    ctx = ScoreContext(device=device, seed=seed, progress=False)
    tracker = _Tracker.start(d0)
    sb = search_batches or batches
    placement = announce_cache(model, spec, sb, device, cache)
    ref_search = DepthSearch(model, spec, sb, device, representation=representation, progress=progress,
                             placement=placement)
    ref_cache = ref_search.prefix_pass()
    ref_search.set_reference(ref_cache)
    ref_cache.close()
    reference = ref_search.ref
    work = copy.deepcopy(model)  # private: the caller's model changes only when the pipeline applies the plan
    steps: list[HybridStep] = []
    bar = tqdm(total=round(ratio * 100, 1), desc="hybrid pruning (% removed)", disable=not progress, unit="%")
    while True:
        left = target - (total - count_params(work))
        if left <= 0.001 * total:
            break
        search = DepthSearch(work, spec, sb, device, representation=representation, progress=progress,
                             placement=placement)
        search.ref = reference
        cache = search.prefix_pass()
        parent = search.represent(cache[max(cache)])
        block_params = count_params(spec.get_layers(work)[0])
        step = HybridStep(step=len(steps), params=count_params(work))
        opts = dict(attn_units=attn_units, refit=refit if compare_refit else "none", damp=damp)
        if left < block_params or len(spec.get_layers(work)) <= 1:  # last, exact width step
            width = _width_plan(work, spec, batches, left, mode, ctx, **opts)
            if width is None:
                cache.close()
                break
            apply_plan(work, width, spec)
            tracker.width(width)
            step.choice, step.final = "width", True
        else:
            scores = search.score(cache, ("cka",), parent=parent, desc=f"step {len(steps) + 1}: depth candidates")
            best = choose(scores, "cka")[0]
            depth = PrunePlan.blocks_only(work.config.model_type, spec.dims(work.config), [best], criterion="cka",
                                          target_ratio=0.0)
            depth.weights = (_standin(work, spec, depth, batches, device, standin_damp, standin_form)
                             if standin and compare_refit else None)
            step.cka_depth = (search.cka_to(parent, candidate_representation(search, depth, depth.weights))
                              if depth.weights else scores["cka_parent"][best])
            width = _width_plan(work, spec, batches, block_params, mode, ctx, **opts)
            step.cka_width = (float("-inf") if width is None
                              else search.cka_to(parent, candidate_representation(search, width, width.weights)))
            step.depth_block, step.candidates, step.metrics = tracker.orig_layers[best], list(tracker.orig_layers), scores
            if step.cka_depth >= step.cka_width:
                apply_plan(work, depth, spec, depth.weights or {})
                step.choice, step.removed_block = "depth", tracker.depth(best)
            else:
                apply_plan(work, width, spec)
                tracker.width(width)
                step.choice = "width"
        cache.close()
        step.removed_params = step.params - count_params(work)
        steps.append(step)
        log.info("hybrid step %d: %s", step.step, step.choice)
        bar.n = round(100 * (total - count_params(work)) / total, 1)
        bar.refresh()
    bar.close()
    plan = tracker.plan(d0, model.config.model_type, mode, ratio, steps)
    plan.refit, plan.standin, plan.damp = refit, standin, damp if refit != "none" else 0.0
    plan.standin_damp = standin_damp if standin else None
    plan.standin_form = standin_form
    return plan
