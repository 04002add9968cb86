"""Least-squares refit of the kept o_proj/down_proj columns: exactness, identity, pads, export, replay."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batches
from test_surgery import logits
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.arch import get_spec
from amp_prune.calib.data import to_batches
from amp_prune.errors import AmpPruneError
from amp_prune.plan import LayerPlan, PrunePlan
from amp_prune.refit import compute_weights
from amp_prune.surgery import apply_plan
from amp_prune.width.refit import Gram, refit_columns

CPU = torch.device("cpu")
SMALL = dict(num_samples=4, seq_len=32, eval_samples=2, batch_size=2, progress=False)


def _plan(model, layers, **kw) -> PrunePlan:
    d = get_spec(model.config.model_type).dims(model.config)
    return PrunePlan(model_type=model.config.model_type, dims=d, gqa_mode="group", criterion="test", target_ratio=0.0,
                     layers=layers, **kw)


def duplicated_model():
    """Tiny GQA Llama whose KV group 1 copies group 0 and MLP channels 50..95 copy channels 0..45, in every block."""
    model = tiny_model("llama_gqa")
    hd, g = 8, 4
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.k_proj.weight[hd:2 * hd] = a.k_proj.weight[:hd]
            a.v_proj.weight[hd:2 * hd] = a.v_proj.weight[:hd]
            a.q_proj.weight[g * hd:] = a.q_proj.weight[:g * hd]
            m.gate_proj.weight[50:] = m.gate_proj.weight[:46]
            m.up_proj.weight[50:] = m.up_proj.weight[:46]
    return model


def test_refit_restores_removed_units_that_kept_ones_duplicate():
    """Removed units whose inputs equal kept ones': the refit moves their weight over, the output is unchanged."""
    model, batches = duplicated_model(), random_batches(seed=3)
    layers = [LayerPlan(i, heads=[4, 5, 6, 7], kv_heads=[1], channels=list(range(50, 96))) for i in range(3)]
    plan = _plan(model, layers, refit="onepass", damp=1e-9)
    plan.weights = compute_weights(model, get_spec("llama"), plan, batches, CPU, progress=False)
    ref = duplicated_model()
    no_refit = apply_plan(duplicated_model(), _plan(model, layers))
    apply_plan(model, plan)
    b = batches[0]
    mask = b.attention_mask.bool()
    torch.testing.assert_close(logits(model, b)[mask], logits(ref, b)[mask], atol=1e-4, rtol=1e-4)
    assert (logits(no_refit, b)[mask] - logits(ref, b)[mask]).abs().max() > 1e-2  # without refit it is not restored


def test_gram_equals_the_plain_sum_of_outer_products():
    """The blocked upper-triangle accumulation, made symmetric on read, equals ``x.T @ x`` summed over batches,
    also for a width the blocks do not divide, for batches added after a read, and ignores empty batches."""
    torch.manual_seed(0)
    xs = [torch.randn(n, 23, dtype=torch.float64) for n in (7, 0, 5, 11)]
    g = Gram()
    assert g.g is None
    for x in xs[:3]:
        g.add(x)
    ref = sum(x.T @ x for x in xs[:3])
    assert g.n == 12 and g.g.dtype == torch.float32
    torch.testing.assert_close(g.g.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(g.g, g.g.T)
    g.add(xs[3][:, :].T.contiguous().T)  # a non-contiguous batch, added after a read
    torch.testing.assert_close(g.g.double(), ref + xs[3].T @ xs[3], rtol=1e-5, atol=1e-4)
    assert g.n == 23


def test_refit_with_nothing_removed_is_the_identity():
    torch.manual_seed(0)
    w, x = torch.randn(16, 24), torch.randn(200, 24)
    gram = x.T @ x
    torch.testing.assert_close(refit_columns(w, gram, torch.arange(24), damp=0.01), w, atol=1e-5, rtol=1e-5)
    assert torch.equal(refit_columns(w, None, torch.arange(3), damp=0.01), w[:, :3])
    assert torch.equal(refit_columns(w, torch.zeros(24, 24), torch.arange(3), damp=0.01), w[:, :3])
    rank1 = x[:1].T @ x[:1]  # rank-deficient: damping keeps the solve finite
    assert torch.isfinite(refit_columns(w, rank1, torch.arange(0, 24, 2), damp=0.01)).all()


def test_pads_do_not_change_the_refit():
    model = tiny_model("qwen2")
    spec = get_spec("qwen2")
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (20, 33, 17, 40)]
    tight, padded = to_batches(chunks, 1, pad_id=3), to_batches(chunks, 4, pad_id=3)  # no pads vs many pads
    layers = [LayerPlan(i, heads=[0, 1, 2], kv_heads=[0], channels=list(range(20))) for i in range(3)]
    w1 = compute_weights(model, spec, _plan(model, layers, refit="onepass", damp=0.01), tight, CPU, progress=False)
    w2 = compute_weights(model, spec, _plan(model, layers, refit="onepass", damp=0.01), padded, CPU, progress=False)
    for i in w1:
        for k in w1[i]:
            torch.testing.assert_close(w1[i][k], w2[i][k], atol=5e-5, rtol=1e-3)  # fp32 noise of padded attention


def test_a_refit_plan_needs_its_weights_and_a_plain_one_does_not():
    model = tiny_model("llama_gqa")
    layers = [LayerPlan(i, channels=[0, 1]) for i in range(3)]
    with pytest.raises(AmpPruneError, match="needs weights computed from calibration data"):
        apply_plan(tiny_model("llama_gqa"), _plan(model, layers, refit="onepass"))
    apply_plan(model, PrunePlan.from_dict(_plan(model, layers).to_dict()))
    assert model.config.intermediate_size == 94


@pytest.mark.parametrize("refit", ["onepass", "sequential"])
def test_refit_run_exports_reloads_and_replays_identically(tiny_dir, tmp_path, refit):
    src, out = tiny_dir("qwen2"), tmp_path / "o"
    res = prune(PruneConfig.from_flat(model=str(src), out=str(out), refit=refit, **SMALL))
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["refit"] == refit and plan["calibration"]["num_samples"] == 4 and plan["split"]
    assert sum(c["chosen"] for c in plan["split"]) == 1 and all(c["calib_loss"] > 0 for c in plan["split"])
    assert res.summary["export_max_abs_diff"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    unrefit = apply_plan(tiny_model("qwen2"), PrunePlan.from_dict({**plan, "refit": "none"}))
    w = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(reloaded.state_dict()[w], unrefit.state_dict()[w])  # the refit changed the kept weights
    replay = prune(PruneConfig.from_flat(model=str(src), plan=str(out / "pruning_plan.json"), out=str(tmp_path / "r"),
                                         **SMALL))
    a, b = res.model.state_dict(), replay.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_split_search_considers_every_feasible_split(tiny_dir, tmp_path):
    res = prune(PruneConfig.from_flat(model=str(tiny_dir()), out=str(tmp_path / "o"), ratio=0.2, **SMALL))
    split = res.plan.split
    assert [c["attn_units"] for c in split] == sorted(c["attn_units"] for c in split) and len(split) >= 2
    best = min(split, key=lambda c: c["calib_loss"])
    assert best["chosen"] and res.plan.attn_units == best["attn_units"]
    forced = prune(PruneConfig.from_flat(model=str(tiny_dir()), ratio=0.2, attn_units="0", **SMALL), save=False)
    assert forced.plan.attn_units == 0 and [c["attn_units"] for c in forced.plan.split] == [0]
    with pytest.raises(AmpPruneError, match="--attn-units 5 cannot meet"):
        prune(PruneConfig.from_flat(model=str(tiny_dir()), ratio=0.2, attn_units="5", **SMALL), save=False)
