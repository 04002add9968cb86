"""Every supported family: the block runner equals the stock forward, and width, depth and hybrid runs export,
reload with plain from_pretrained, match the stock logits and replay their plan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, random_batches
from tiny import WINDOW, tiny_model
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.arch import SUPPORTED_MODEL_TYPES, get_spec
from amp_prune.calib.blockwise import capture_inputs, final_logits, run_blocks
from amp_prune.plan import PrunePlan
from amp_prune.surgery import apply_plan

CPU = torch.device("cpu")
LONG = (40, 33, 17, 12)  # longer than the sliding window of the families that have one
MIXED = {"gemma2", "gemma3_text", "exaone4", "cohere2"}  # sliding and full layers


def stock_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def runner_logits(model, batch):
    spec = get_spec(model.config.model_type)
    (state,) = run_blocks(model, spec, capture_inputs(model, spec, [batch], CPU), CPU, progress=False)
    return final_logits(model, spec, state.hidden, CPU)


def test_every_model_type_has_a_tiny_model():
    assert {tiny_model(f).config.model_type for f in FAMILIES} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_equals_the_stock_forward_before_and_after_dropping_a_block(family):
    model = tiny_model(family)
    types = getattr(model.config, "layer_types", None)
    if family in MIXED:
        assert len(set(types)) > 1 and model.config.sliding_window == WINDOW < max(LONG)
    for stage in ("dense", "block 1 dropped"):
        for b in random_batches(lengths=LONG, batch_size=2, seed=5):
            mask = b.attention_mask.bool()
            torch.testing.assert_close(runner_logits(model, b)[mask], stock_logits(model, b)[mask], atol=2e-5, rtol=0,
                                       msg=lambda m: f"{stage}: {m}")
        if stage == "dense":
            spec = get_spec(model.config.model_type)
            apply_plan(model, PrunePlan.blocks_only(model.config.model_type, spec.dims(model.config), [1],
                                                    criterion="given", target_ratio=0.0))
            if types is not None:  # block 2 keeps its own layer type
                assert model.config.layer_types == [types[0], types[2]]


CASES = {
    "width-group": dict(method="width", ratio=0.2, gqa_mode="group"),
    "width-heads": dict(method="width", ratio=0.2, gqa_mode="heads"),
    "depth": dict(method="cka", layers=1),
    "hybrid": dict(method="hybrid", ratio=0.3),
}
SMALL = dict(num_samples=6, seq_len=40, eval_samples=2, batch_size=2, progress=False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_reloads_and_replays(family, case, tiny_dir, tmp_path):
    src, out = tiny_dir(family), tmp_path / "out"
    result = prune(PruneConfig.from_flat(model=str(src), out=str(out), **{**SMALL, **CASES[case]}))
    s = result.summary
    assert s["params_after"] < s["params_before"]
    assert s["export_max_abs_diff"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain: no trust_remote_code, no amp_prune code
    assert type(reloaded).__name__ in {type(result.model).__name__, "MistralForCausalLM"}
    assert sum(p.numel() for p in reloaded.parameters()) == s["params_after"]
    for b in random_batches(lengths=LONG, batch_size=2, seed=7):
        mask = b.attention_mask.bool()
        torch.testing.assert_close(stock_logits(reloaded, b)[mask], stock_logits(result.model, b)[mask], atol=1e-5,
                                   rtol=0)
    replay = prune(PruneConfig.from_flat(model=str(src), plan=str(out / "pruning_plan.json"), **SMALL), save=False)
    want, got = result.model.state_dict(), replay.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    run = json.loads((out / "run.json").read_text())
    assert run["timings"]["runner_check_max_abs_diff"] <= 1e-4
