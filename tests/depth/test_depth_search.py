"""Depth pruning: block removal bookkeeping, the CKA search, hybrid, and their exports."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, random_batches
from test_surgery import logits
from tiny import char_tokenizer, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from amp_prune.arch import get_spec
from amp_prune.errors import AmpPruneError
from amp_prune.io.export import export
from amp_prune.depth.hybrid import plan_hybrid
from amp_prune.config import LAYER_CRITERIA
from amp_prune.depth import search as search_mod
from amp_prune.depth.search import DepthSearch, plan_depth, search_dtype
from amp_prune.surgery import remove_blocks
from amp_prune.plan import PrunePlan
from amp_prune.width.budget import count_params
from amp_prune.surgery import apply_plan

CPU = torch.device("cpu")


class Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_block_equals_identity_block(family, tmp_path):
    model = tiny_model(family, layers=4)
    ref = tiny_model(family, layers=4)
    ref.model.layers[2] = Identity()
    spec = get_spec(model.config.model_type)
    remove_blocks(model, spec, [2])
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    for b in random_batches(seed=4):
        mask = b.attention_mask.bool()
        torch.testing.assert_close(logits(model, b)[mask], logits(ref, b)[mask], atol=1e-6, rtol=1e-6)
    # the KV cache is indexed by layer_idx: cached greedy decoding must equal uncached decoding
    ids = torch.tensor([[5, 9, 14, 20, 7]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=3)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=3)
    assert torch.equal(cached, plain)
    check = export(model, char_tokenizer(), tmp_path / "d", check_batches=random_batches()[:1], device=CPU)
    assert check.max_abs_diff == 0.0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 3


@pytest.mark.parametrize("placement", ["cpu", "disk", "recompute"])
def test_every_cache_placement_gives_the_scores_of_the_device_cache(placement):
    model = tiny_model("llama_gqa", layers=5)
    spec = get_spec("llama")
    fast = DepthSearch(model, spec, random_batches(), CPU, placement="device", progress=False)
    other = DepthSearch(model, spec, random_batches(), CPU, placement=placement, progress=False)
    for s in (fast, other):
        s.set_reference(s.prefix_pass())
        s.removed = {1}  # a removal on top, so candidates skip blocks
    metrics = ("cka", "kl", "angular", "bi")
    a = fast.score(fast.prefix_pass(), metrics)
    b = other.score(other.prefix_pass(), metrics)
    for k in metrics:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def _assert_untouched(model, before):
    state, cfg = before
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == cfg


@pytest.mark.parametrize("criterion", LAYER_CRITERIA)
def test_search_returns_a_plan_leaves_the_model_and_the_plan_replays(criterion):
    model = tiny_model("qwen3", layers=5)
    spec = get_spec("qwen3")
    before = _state(model)
    plan = plan_depth(model, spec, random_batches(), 2, device=CPU, criterion=criterion, progress=False)
    _assert_untouched(model, before)  # the search only skipped blocks, it removed none
    assert len(plan.removed_layers) == 2 and len(plan.steps) == 2 and plan.method == "cka"
    assert len(plan.steps[0].candidates) == 5 and len(plan.steps[1].candidates) == 4
    assert plan.steps[0].removed[0] not in plan.steps[1].candidates
    ref = tiny_model("qwen3", layers=5)
    for i in plan.removed_layers:
        ref.model.layers[i] = Identity()
    fresh = apply_plan(tiny_model("qwen3", layers=5), PrunePlan.from_dict(plan.to_dict()))
    assert fresh.config.num_hidden_layers == 3
    for b in random_batches(seed=6):
        mask = b.attention_mask.bool()
        torch.testing.assert_close(logits(fresh, b)[mask], logits(ref, b)[mask], atol=1e-6, rtol=1e-6)


def test_cka_search_picks_a_block_that_does_nothing():
    model = tiny_model("mistral", layers=4)
    with torch.no_grad():  # block 1 writes nothing into the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    plan = plan_depth(model, get_spec("mistral"), random_batches(), 1, device=CPU, progress=False)
    assert plan.removed_layers == [1] and plan.steps[0].metrics["cka"][1] == pytest.approx(1.0)


def test_search_dtype_resolution(monkeypatch):
    model = tiny_model("llama_gqa", layers=4)
    assert search_dtype(model, CPU, "model") is None
    assert search_dtype(model, CPU, "bfloat16") is torch.bfloat16
    assert search_dtype(copy_to(model, torch.bfloat16), CPU, "bfloat16") is None  # already half precision
    for native, expect in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(search_mod, "native_bf16", lambda device, native=native: native)
        assert search_dtype(model, CPU, "auto") is expect
    assert search_dtype(copy_to(model, torch.float16), CPU, "auto") is None
    assert search_dtype(copy_to(model, torch.float16), CPU, "bfloat16") is torch.bfloat16
    with pytest.raises(AmpPruneError, match="unknown --depth-dtype 'fp8'"):
        search_dtype(model, CPU, "fp8")


def copy_to(model, dtype):
    return copy.deepcopy(model).to(dtype)


@pytest.mark.parametrize("dtype, expect", [("model", torch.float32), ("bfloat16", torch.bfloat16)])
def test_search_forward_passes_run_in_the_requested_dtype(dtype, expect):
    """bf16 autocast reaches every block's projections; the model's weights and the plan's shape are untouched."""
    model = inert_block_model()
    seen = set()
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for layer in model.model.layers]
    plan = plan_depth(model, get_spec("llama"), random_batches(), 1, device=CPU, dtype=dtype, progress=False)
    for h in hooks:
        h.remove()
    assert seen == {expect}
    assert next(model.parameters()).dtype == torch.float32
    assert plan.removed_layers == [3]  # the inert block, in either dtype


def test_one_shot_scores_once():
    model = tiny_model("llama_mha", layers=5)
    plan = plan_depth(model, get_spec("llama"), random_batches(), 3, device=CPU, iterative=False, progress=False)
    assert len(plan.steps) == 1 and len(plan.removed_layers) == 3 and plan.steps[0].removed == plan.removed_layers


@pytest.mark.parametrize("n", [0, -1, 4, 7])
def test_bad_layer_counts(n):
    with pytest.raises(AmpPruneError, match="--layers must be between 1 and 3"):
        plan_depth(tiny_model("llama_gqa", layers=4), get_spec("llama"), random_batches(), n, device=CPU)


def inert_block_model(block: int = 3):
    """An 8-block tiny Llama whose block ``block`` adds nothing to the residual stream."""
    model = tiny_model("llama_gqa", layers=8)
    with torch.no_grad():
        model.model.layers[block].self_attn.o_proj.weight.zero_()
        model.model.layers[block].mlp.down_proj.weight.zero_()
    return model


def test_hybrid_reaches_ratio_and_replays(tmp_path):
    model = inert_block_model()
    total, before = count_params(model), _state(model)
    plan = plan_hybrid(model, get_spec("llama"), random_batches(), 0.4, device=CPU, progress=False)
    _assert_untouched(model, before)  # the search shrank a private copy only
    apply_plan(model, plan)
    assert abs(1 - count_params(model) / total - 0.4) <= 0.01
    choices = [s.choice for s in plan.steps]
    assert choices[0] == "depth" and plan.steps[0].removed_block == 3  # the inert block is free to drop
    assert "width" in choices[1:]  # random blocks are not: width steps win on this model
    assert plan.removed_layers == [3] and choices.count("depth") == 1
    assert plan.steps[1].cka_width > plan.steps[1].cka_depth
    fresh = apply_plan(inert_block_model(), PrunePlan.from_dict(plan.to_dict()))
    b = random_batches(seed=7)[0]
    torch.testing.assert_close(logits(model, b), logits(fresh, b), atol=1e-6, rtol=1e-6)
    check = export(model, char_tokenizer(), tmp_path / "h", check_batches=random_batches()[:1], device=CPU)
    assert check.ok
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert re.config.num_hidden_layers == 8 - len(plan.removed_layers)
    assert count_params(re) == count_params(model)
