"""Physical pruning equals zeroing the same units, for every supported family and GQA mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, random_batches
from tiny import tiny_model

from amp_prune.arch import get_spec
from amp_prune.width.criteria import ScoreContext, get_criterion
from amp_prune.errors import AmpPruneError
from amp_prune.plan import LayerPlan, PrunePlan
from amp_prune.width.budget import attn_options, compute_budget, count_params, effective_mode
from amp_prune.width.planner import make_plan
from amp_prune.surgery import apply_plan

CPU = torch.device("cpu")


def zero_units(model, plan: PrunePlan):
    """Reference written independently of surgery: zero o_proj columns / down_proj columns."""
    ref = copy.deepcopy(model)
    hd = plan.dims["head_dim"]
    names = dict(ref.named_modules())
    with torch.no_grad():
        for lp in plan.layers:
            o = names[f"model.layers.{lp.layer}.self_attn.o_proj"].weight
            for h in lp.heads:
                o[:, h * hd:(h + 1) * hd] = 0
            down = names[f"model.layers.{lp.layer}.mlp.down_proj"].weight
            down[:, lp.channels] = 0
    return ref


def build_plan(model, mode="group", criterion="amp", ratio=0.3):
    spec = get_spec(model.config.model_type)
    mode = effective_mode(model, spec, mode)
    scores = get_criterion(criterion)(model, spec, random_batches(), ScoreContext(CPU, progress=False))
    return make_plan(model, spec, scores, compute_budget(model, spec, ratio, mode), mode=mode, criterion=criterion,
                     ratio=ratio)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.mark.parametrize("mode", ["group", "heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_zeroed(family, mode):
    model = tiny_model(family)
    if family == "olmo2":  # test_olmo2_head_norms_follow_the_kept_heads instead
        pytest.skip("OLMo 2 normalizes q and k over all heads together, so removing heads is not zeroing them")
    plan = build_plan(model, mode)
    spec = get_spec(model.config.model_type)
    # heads go wherever the family can express fewer (not Helium)
    can_remove_heads = max(attn_options(model, spec, effective_mode(model, spec, mode))) > 0
    assert can_remove_heads == (family != "helium")  # one KV head (Gemma 3): heads mode either way
    assert any(lp.channels for lp in plan.layers)
    assert any(lp.heads for lp in plan.layers) == can_remove_heads
    ref = zero_units(model, plan)
    before = count_params(model)
    apply_plan(model, plan)
    assert count_params(model) < before
    for b in random_batches(seed=1):
        mask = b.attention_mask.bool()
        torch.testing.assert_close(logits(model, b)[mask], logits(ref, b)[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["group", "heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_tensor_shapes(family, mode):
    model = tiny_model(family)
    apply_plan(model, build_plan(model, mode))
    spec = get_spec(model.config.model_type)
    d = spec.dims(model.config)
    for layer in spec.get_layers(model):
        attn, mlp = spec.attention(layer), spec.mlp_module(layer)
        q_out = d["n_heads"] * d["head_dim"]
        kv_out = d["n_kv"] * d["head_dim"]
        if spec.qkv:
            assert attn.qkv_proj.weight.shape == (q_out + 2 * kv_out, d["hidden"])
        else:
            assert attn.q_proj.weight.shape == (q_out, d["hidden"]) == (attn.q_proj.out_features, attn.q_proj.in_features)
            assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv_out, d["hidden"])
            if attn.q_proj.bias is not None:
                assert attn.q_proj.bias.shape == (q_out,)
        if spec.gate_up:
            assert mlp.gate_up_proj.weight.shape == (2 * d["intermediate"], d["hidden"])
        else:
            assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (d["intermediate"], d["hidden"])
        for name, n in (("q_norm", d["n_heads"]), ("k_norm", d["n_kv"])):  # norms that span heads follow them
            w = getattr(getattr(attn, name, None), "weight", None)
            if w is not None:
                assert tuple(w.shape) in {(d["head_dim"],), (n * d["head_dim"],), (n, d["head_dim"])}, (name, w.shape)
        assert attn.o_proj.weight.shape == (d["hidden"], q_out) and attn.o_proj.in_features == q_out
        assert mlp.down_proj.weight.shape == (d["hidden"], d["intermediate"])
        assert attn.num_key_value_groups == d["n_heads"] // d["n_kv"]


@pytest.mark.parametrize("mode", ["group", "heads"])
def test_olmo2_head_norms_follow_the_kept_heads(mode):
    """OLMo 2's q_norm/k_norm weights are [n * head_dim]: the pruned ones are the kept heads' slices, in order."""
    model = tiny_model("olmo2")  # 4 heads, 2 KV heads of 16
    plan = build_plan(model, mode)
    dense = copy.deepcopy(model)
    apply_plan(model, plan)
    hd = plan.dims["head_dim"]
    for lp in plan.layers:
        for name, gone, n in (("q_norm", lp.heads, 4), ("k_norm", lp.kv_heads, 2)):
            want = torch.cat([getattr(dense.model.layers[lp.layer].self_attn, name).weight[h * hd:(h + 1) * hd]
                              for h in range(n) if h not in gone])
            assert torch.equal(getattr(model.model.layers[lp.layer].self_attn, name).weight, want)


def test_mode_changes_what_is_removed():
    model = tiny_model("llama_gqa")  # 8 heads, 2 KV heads
    group, heads = build_plan(model, "group"), build_plan(model, "heads")
    assert group.layers[0].kv_heads and len(group.layers[0].heads) == 4  # a whole group of 4 heads
    assert not heads.layers[0].kv_heads and len(heads.layers[0].heads) == 2  # one head in each group
    assert {h // 4 for h in heads.layers[0].heads} == {0, 1}


def test_plan_replays_on_fresh_model_via_json(tmp_path):
    model = tiny_model("qwen2")
    plan = build_plan(model, "heads")
    plan.save(tmp_path / "plan.json")
    apply_plan(model, plan)
    fresh = tiny_model("qwen2")
    apply_plan(fresh, PrunePlan.load(tmp_path / "plan.json"))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_scoring_does_not_mutate_model():
    model = tiny_model("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for crit in ("amp", "magnitude", "obs", "random", "wanda_sp"):
        build_plan(model, criterion=crit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_plans_are_rejected():
    model = tiny_model("llama_gqa")
    plan = build_plan(model, "heads")
    bad = copy.deepcopy(plan)
    bad.layers[0].heads = bad.layers[0].heads[:1]  # uneven groups in layer 0 -> shapes differ
    with pytest.raises(AmpPruneError, match="same number|different shapes"):
        apply_plan(tiny_model("llama_gqa"), bad)
    other = tiny_model("qwen3")
    with pytest.raises(AmpPruneError, match="plan was made for"):
        apply_plan(other, plan)
    bad = copy.deepcopy(plan)
    bad.layers[1].channels = [10_000]
    with pytest.raises(AmpPruneError, match="invalid channels"):
        apply_plan(tiny_model("llama_gqa"), bad)
    bad = copy.deepcopy(plan)
    bad.layers[0] = LayerPlan(layer=0, heads=[0, 1, 2, 3], kv_heads=[])  # drops all heads of group 0 but keeps KV 0
    with pytest.raises(AmpPruneError):
        apply_plan(tiny_model("llama_gqa"), bad)
