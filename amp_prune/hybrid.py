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
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calibration import Batch
from amp_prune.criteria import ScoreContext, amp_scores
from amp_prune.errors import AmpPruneError
from amp_prune.layer_drop import DepthSearch, choose, drop_blocks
from amp_prune.plan import LayerPlan, PrunePlan, compute_budget, count_params, effective_mode, make_plan
from amp_prune.surgery import apply_plan

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

    def plan(self, d: dict[str, int], model_type: str, mode: str, ratio: float, steps: list[dict]) -> PrunePlan:
        layers = []
        for o in range(d["n_layers"]):
            layers.append(LayerPlan(layer=o, heads=sorted(set(range(d["n_heads"])) - set(self.heads[o])),
                                    kv_heads=sorted(set(range(d["n_kv"])) - set(self.kv[o])),
                                    channels=sorted(set(range(d["intermediate"])) - set(self.channels[o]))))
        removed = sorted(set(range(d["n_layers"])) - set(self.orig_layers))
        return PrunePlan(model_type=model_type, dims=d, gqa_mode=mode, criterion="amp+cka", target_ratio=ratio,
                         layers=layers, removed_layers=removed, method="hybrid", steps=steps)


def _width_step(model: nn.Module, spec: ArchSpec, batches: list[Batch], n_params: float, mode: str,
                ctx: ScoreContext) -> tuple[nn.Module, PrunePlan] | None:
    """A copy of ``model`` with about ``n_params`` removed by AMP, uniformly; ``None`` if nothing fits."""
    try:
        budget = compute_budget(model, spec, n_params / count_params(model), mode)
    except AmpPruneError:
        return None
    if budget.expected_removed == 0:
        return None
    scores = amp_scores(model, spec, batches, ScoreContext(ctx.device, ctx.seed, progress=False))
    plan = make_plan(model, spec, scores, budget, mode=mode, criterion="amp", ratio=n_params / count_params(model))
    cand = copy.deepcopy(model)
    apply_plan(cand, plan, spec)
    return cand, plan


def hybrid_search(model: nn.Module, spec: ArchSpec, batches: list[Batch], ratio: float, *, device: torch.device,
                  gqa_mode: str = "group", representation: str = "pooled", seed: int = 0,
                  progress: bool = True) -> tuple[nn.Module, PrunePlan]:
    """Prune ``model`` to about ``ratio`` of its parameters; return the pruned model and its plan."""
    d0 = spec.dims(model.config)
    mode = effective_mode(model, spec, gqa_mode)
    total = count_params(model)
    target = ratio * total
    ctx = ScoreContext(device=device, seed=seed, progress=False)
    tracker = _Tracker.start(d0)
    ref_search = DepthSearch(model, spec, batches, device, representation=representation, progress=progress)
    ref_search.set_reference(ref_search.prefix_pass())
    reference = ref_search.ref
    del ref_search  # do not keep the unpruned model alive once width steps replace it
    steps: list[dict] = []
    bar = tqdm(total=round(ratio * 100, 1), desc="hybrid pruning (% removed)", disable=not progress, unit="%")
    while True:
        removed = total - count_params(model)
        left = target - removed
        if left <= 0.001 * total:
            break
        search = DepthSearch(model, spec, batches, device, representation=representation, progress=progress)
        search.ref = reference
        cache = search.prefix_pass()
        parent = search.represent(cache[max(cache)])
        block_params = count_params(spec.get_layers(model)[0])
        step = {"step": len(steps), "params": count_params(model)}
        if left < block_params or len(spec.get_layers(model)) <= 1:  # last, exact width step
            width = _width_step(model, spec, batches, left, mode, ctx)
            if width is None:
                break
            model, plan = width
            tracker.width(plan)
            step.update(choice="width", final=True, removed_params=step["params"] - count_params(model))
            steps.append(step)
        else:
            scores = search.score(cache, ("cka",), parent=parent, desc=f"step {len(steps) + 1}: depth candidates")
            best = choose(scores, "cka")[0]
            cka_depth = scores["cka_parent"][best]
            width = _width_step(model, spec, batches, block_params, mode, ctx)
            cka_width = float("-inf")
            if width is not None:
                w_search = DepthSearch(width[0], spec, batches, device, representation=representation, progress=False)
                cka_width = search.cka_to(parent, w_search.represent(w_search.prefix_pass()[len(spec.get_layers(width[0]))]))
            step.update(cka_depth=cka_depth, cka_width=cka_width, depth_block=tracker.orig_layers[best],
                        candidates=list(tracker.orig_layers), metrics=scores)
            if cka_depth >= cka_width:
                drop_blocks(model, spec, [best])
                step["choice"] = "depth"
                step["removed_block"] = tracker.depth(best)
            else:
                model, plan = width
                tracker.width(plan)
                step["choice"] = "width"
            step["removed_params"] = step["params"] - count_params(model)
            steps.append(step)
        log.info("hybrid step %d: %s", step["step"], step["choice"])
        bar.n = round(100 * (total - count_params(model)) / total, 1)
        bar.refresh()
    bar.close()
    return model, tracker.plan(d0, model.config.model_type, mode, ratio, steps)
