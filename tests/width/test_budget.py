"""Budget arithmetic: the achieved ratio matches the target, uniformly over blocks."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from amp_prune.arch import get_spec
from amp_prune.width.criteria import ScoreContext, random_scores
from amp_prune.errors import AmpPruneError
from amp_prune.width.budget import compute_budget, count_params
from amp_prune.width.planner import make_plan
from amp_prune.surgery import apply_plan


@pytest.mark.parametrize("family,mode", [("llama_gqa", "group"), ("llama_gqa", "heads"), ("qwen2", "group"),
                                         ("phi3", "heads"), ("llama_mha", "group")])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4])
def test_achieved_ratio_matches_prediction_and_target(family, mode, ratio):
    model = tiny_model(family)
    spec = get_spec(model.config.model_type)
    budget = compute_budget(model, spec, ratio, mode)
    before = count_params(model)
    plan = make_plan(model, spec, random_scores(model, spec, [], ScoreContext(torch.device("cpu"))), budget,
                     mode=mode, criterion="random", ratio=ratio)
    apply_plan(model, plan)
    removed = before - count_params(model)
    assert removed == budget.expected_removed  # the budget's parameter accounting is exact
    assert abs(removed / before - ratio) < 0.02  # tiny models have coarse units; SmolLM2 is held to 0.01


def test_ratio_too_large_for_blocks():
    model = tiny_model("llama_gqa")  # embeddings are a large share of a tiny model
    with pytest.raises(AmpPruneError, match="lower --ratio"):
        compute_budget(model, get_spec("llama"), 0.95, "group")


def test_uniform_counts_across_blocks():
    model = tiny_model("qwen3")
    spec = get_spec("qwen3")
    budget = compute_budget(model, spec, 0.3, "group")
    plan = make_plan(model, spec, random_scores(model, spec, [], ScoreContext(torch.device("cpu"))), budget,
                     mode="group", criterion="random", ratio=0.3)
    assert len({(len(lp.heads), len(lp.kv_heads), len(lp.channels)) for lp in plan.layers}) == 1
