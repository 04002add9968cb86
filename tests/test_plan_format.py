"""The plan file: typed steps with a type tag, version-1 files without it still load, and loud surgery."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batches
from test_surgery import logits
from tiny import tiny_model

from amp_prune.arch import get_spec
from amp_prune.depth.hybrid import _width_plan, candidate_representation
from amp_prune.depth.search import DepthSearch
from amp_prune.errors import AmpPruneError
from amp_prune.plan import DepthStep, HybridStep, LayerPlan, PrunePlan
from amp_prune.surgery import apply_plan
from amp_prune.width.criteria import ScoreContext

CPU = torch.device("cpu")
D = {"hidden": 64, "n_heads": 8, "n_kv": 2, "head_dim": 8, "intermediate": 96, "n_layers": 3}


def test_steps_round_trip_with_a_type_tag():
    plan = PrunePlan.blocks_only("llama", D, [1], criterion="cka", target_ratio=0.1, method="hybrid", steps=[
        DepthStep(step=0, candidates=[0, 1, 2], metrics={"cka": [0.1, 0.9, 0.2]}, removed=[1]),
        HybridStep(step=1, params=100, choice="depth", removed_params=10, cka_depth=0.9, cka_width=0.8,
                   depth_block=1, removed_block=1, candidates=[0, 1, 2], metrics={"cka": [0.1, 0.9, 0.2]})])
    d = json.loads(json.dumps(plan.to_dict()))
    assert [s["type"] for s in d["steps"]] == ["depth", "hybrid"]
    assert PrunePlan.from_dict(d) == plan


def test_version_1_plans_without_step_tags_still_load():
    v1 = {"model_type": "llama", "dims": D, "gqa_mode": "group", "criterion": "amp+cka", "target_ratio": 0.2,
          "layers": [{"layer": i, "heads": [], "kv_heads": [], "channels": [0]} for i in range(3)],
          "removed_layers": [2], "method": "hybrid", "version": 1, "steps": [
              {"step": 0, "params": 500, "cka_depth": 0.99, "cka_width": 0.9, "depth_block": 2, "candidates": [0, 1, 2],
               "metrics": {"cka": [0.1, 0.2, 0.99], "cka_parent": [0.1, 0.2, 0.99]}, "choice": "depth",
               "removed_block": 2, "removed_params": 50},
              {"step": 1, "params": 450, "choice": "width", "final": True, "removed_params": 5}]}
    plan = PrunePlan.from_dict(v1)
    assert isinstance(plan.steps[0], HybridStep) and plan.steps[0].removed_block == 2
    assert plan.steps[1].final and plan.steps[1].cka_depth is None
    depth_v1 = {**v1, "method": "cka", "steps": [{"step": 0, "candidates": [0, 1, 2], "metrics": {"cka": [1, 2, 3]},
                                                   "removed": [2], "score_name": "cka"}]}
    assert isinstance(PrunePlan.from_dict(depth_v1).steps[0], DepthStep)
    with pytest.raises(AmpPruneError, match="unknown plan step type"):
        PrunePlan.from_dict({**v1, "steps": [{"type": "sideways", "step": 0}]})


def test_surgery_fails_loudly_when_a_module_lacks_an_attribute():
    model = tiny_model("llama_gqa")
    del model.model.layers[1].self_attn.num_key_value_groups
    plan = PrunePlan(model_type="llama", dims=D, gqa_mode="group", criterion="amp", target_ratio=0.1,
                     layers=[LayerPlan(i, heads=[0, 1, 2, 3], kv_heads=[0]) for i in range(3)])
    with pytest.raises(AmpPruneError, match="LlamaAttention has no attribute 'num_key_value_groups'"):
        apply_plan(model, plan)


def test_masked_width_candidate_equals_the_pruned_copy():
    """Hybrid scores a width candidate with its units masked instead of removed: the representation must match."""
    model, spec = tiny_model("qwen2", layers=3), get_spec("qwen2")
    batches = random_batches()
    plan = _width_plan(model, spec, batches, 30_000, "group", ScoreContext(CPU, progress=False), attn_units="uniform",
                       refit="none")
    search = DepthSearch(model, spec, batches, CPU, representation="token", progress=False)
    masked = candidate_representation(search, plan)
    pruned = apply_plan(tiny_model("qwen2", layers=3), plan)
    direct = DepthSearch(pruned, spec, batches, CPU, representation="token", progress=False)
    cache = direct.prefix_pass()
    for a, b in zip(masked, direct.represent(cache[max(cache)])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    b0 = batches[0]
    assert not torch.equal(logits(pruned, b0), logits(tiny_model("qwen2", layers=3), b0))  # something was removed


def test_plans_written_before_the_stand_in_form_replay_as_a_folded_map():
    plan = PrunePlan.blocks_only("llama", D, [1], criterion="cka", target_ratio=0.1, standin=True)
    assert plan.standin_form == "down"  # the current default
    d = json.loads(json.dumps(plan.to_dict()))
    assert PrunePlan.from_dict(d).standin_form == "down"
    del d["standin_form"]  # as every plan file before 2026-12-04
    assert PrunePlan.from_dict(d).standin_form == "map"
