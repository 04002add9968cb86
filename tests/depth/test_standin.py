"""The linear stand-in for dropped blocks: exact on a block that is linear in its input, spans, export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batches
from test_surgery import logits
from tiny import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.arch import get_spec
from amp_prune.depth.standin import DAMP_GRID, choose, fit_standins, heldout_error, spans
from amp_prune.plan import PrunePlan
from amp_prune.refit import check_standins, compute_weights
from amp_prune.surgery import apply_plan

CPU = torch.device("cpu")
SMALL = dict(num_samples=4, seq_len=32, eval_samples=2, batch_size=2, progress=False)


class LinearBlock(nn.Module):
    """``h -> h + h A``: a decoder block that is exactly linear in its input."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + hidden_states @ self.a


def linear_block_model():
    """Block 1 is linear, and block 0's attention-side residual ``y`` never reaches the dims ``A`` reads.

    Embeddings are zero in dims 48..63 and block 0 writes no attention output, so ``y = e`` and ``y A = 0``
    when ``A`` has rows 48..63 only: what block 1 adds is then ``m A``, a linear function of block 0's MLP output.
    """
    model = tiny_model("llama_gqa")
    torch.manual_seed(5)
    a = torch.zeros(64, 64)
    a[48:] = torch.randn(16, 64) * 0.3
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 48:] = 0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    model.model.layers[1] = LinearBlock(a)
    return model


@pytest.mark.parametrize("form", ["map", "down"])
def test_the_stand_in_reproduces_a_linear_block(form):
    # block 0 writes no attention output, so z depends on the token alone: enough ids for a full-rank z
    model, spec, batches = linear_block_model(), get_spec("llama"), random_batches((120, 90, 150, 100), seed=8, vocab=128)
    ref = linear_block_model()
    plan = PrunePlan.blocks_only("llama", spec.dims(model.config), [1], criterion="test", target_ratio=0.0,
                                 standin=True, damp=1e-10, standin_form=form)
    fit = fit_standins(model, spec, batches, [1], CPU, damp=1e-10, form=form, progress=False)[0]
    exact = torch.eye(64) + ref.model.layers[1].a  # what block 1 does to block 0's MLP output m: m -> m (I + A)
    if form == "down":  # m = z W^T, so the down_proj that absorbs the block is W^T (I + A)
        exact = ref.model.layers[0].mlp.down_proj.weight.T @ exact
    assert fit.form == form and fit.x.shape == exact.shape
    torch.testing.assert_close(fit.x.float(), exact, atol=1e-4, rtol=1e-4)
    apply_plan(model, plan, spec, compute_weights(model, spec, plan, batches, CPU, progress=False))
    plain = apply_plan(linear_block_model(), PrunePlan.blocks_only("llama", plan.dims, [1], criterion="t",
                                                                   target_ratio=0.0))
    for b in random_batches(seed=9):
        mask = b.attention_mask.bool()
        torch.testing.assert_close(logits(model, b)[mask], logits(ref, b)[mask], atol=1e-4, rtol=1e-4)
        assert (logits(plain, b)[mask] - logits(ref, b)[mask]).abs().max() > 1e-3  # dropping alone is not exact


def test_the_down_form_fits_the_calibration_at_least_as_well_as_the_map():
    """Every folded map ``T^T W`` is a ``down_proj``, so the down form's in-sample residual is never larger."""
    model, spec, batches = tiny_model("llama_gqa", layers=4), get_spec("llama"), random_batches(seed=3)
    err = {}
    for form in ("map", "down"):
        plan = PrunePlan.blocks_only("llama", spec.dims(model.config), [2], criterion="t", target_ratio=0.0,
                                     standin=True, damp=1e-8, standin_form=form)
        pruned = apply_plan(tiny_model("llama_gqa", layers=4), plan, spec,
                            compute_weights(model, spec, plan, batches, CPU, progress=False))
        # the state leaving the last kept block (index 1) against the dense state leaving block 2
        dense, mine = [], []
        h1 = model.model.layers[2].register_forward_hook(lambda _m, _a, out: dense.append(out))
        h2 = pruned.model.layers[1].register_forward_hook(lambda _m, _a, out: mine.append(out))
        for b in batches:
            mask = b.attention_mask.bool()
            logits(model, b), logits(pruned, b)
            d, p = (x.pop()[0] if isinstance(x[-1], tuple) else x.pop() for x in (dense, mine))
            err[form] = err.get(form, 0.0) + float(((p - d)[mask] ** 2).sum())
        h1.remove(), h2.remove()
    assert err["down"] <= err["map"] * (1 + 1e-6)
    assert err["down"] < 0.9 * err["map"]  # with 96 inputs against 64, it is strictly better here


def test_the_down_form_shrinks_toward_the_kept_weights():
    model, spec, batches = tiny_model("llama_gqa", layers=4), get_spec("llama"), random_batches(seed=4)
    w = model.model.layers[1].mlp.down_proj.weight
    stiff = fit_standins(model, spec, batches, [2], CPU, damp=1e6, form="down", progress=False)[1]
    torch.testing.assert_close(stiff.x.T.float(), w, atol=1e-4, rtol=1e-3)  # lam -> inf: X -> P = W^T
    cols = torch.tensor([0, 5, 7, 50])
    part = fit_standins(model, spec, batches, [2], CPU, damp=1e6, form="down", bases={1: (cols, w[:, cols] * 2)},
                        progress=False)[1]
    torch.testing.assert_close(part.x.T.float(), w[:, cols] * 2, atol=1e-4, rtol=1e-3)  # the given prior and columns


def test_spans_and_one_map_per_span():
    assert spans([5, 2, 3, 7, 8, 9]) == [(2, 3), (5, 5), (7, 9)]
    model, spec = tiny_model("mistral", layers=6), get_spec("mistral")
    ts = fit_standins(model, spec, random_batches(), [0, 2, 3, 5], CPU, damp=0.01, form="map", progress=False)
    assert sorted(ts) == [1, 4]  # the span at block 0 has no earlier block to fold into
    assert all(f.x.shape == (64, 64) for f in ts.values())
    none = fit_standins(model, spec, random_batches(), [], CPU, damp=0.01, progress=False)
    assert none == {}


@pytest.mark.parametrize("form", ["down", "map"])
def test_stand_in_run_exports_and_replays(tiny_dir, tmp_path, form):
    src, out = tiny_dir("qwen3"), tmp_path / "o"
    res = prune(PruneConfig.from_flat(model=str(src), method="cka", layers=1, out=str(out), standin_form=form,
                                      **SMALL))
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["standin"] is True and res.summary["export_max_abs_diff"] <= 1e-4
    assert plan["standin_form"] == form and all(f["form"] == form for f in plan["standin_fit"])
    assert plan["standin_damp"] == "auto" and [f["span"] for f in plan["standin_fit"]] == [
        [a, a] for a in res.plan.removed_layers if a >= 1]
    off = prune(PruneConfig.from_flat(model=str(src), method="cka", layers=1, stand_in=False, **SMALL), save=False)
    assert off.plan.removed_layers == res.plan.removed_layers and not off.plan.standin
    k = res.plan.removed_layers[0] - 1
    if k >= 0:
        w = f"model.layers.{k}.mlp.down_proj.weight"
        assert not torch.equal(AutoModelForCausalLM.from_pretrained(out).state_dict()[w], off.model.state_dict()[w])
    replay = prune(PruneConfig.from_flat(model=str(src), plan=str(out / "pruning_plan.json"), **SMALL), save=False)
    a, b = res.model.state_dict(), replay.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("compare_refit", [False, True])
def test_hybrid_with_refit_exports_and_replays(tiny_dir, tmp_path, compare_refit):
    src, out = tiny_dir("llama_gqa"), tmp_path / "h"
    res = prune(PruneConfig.from_flat(model=str(src), method="hybrid", ratio=0.3, out=str(out),
                                      compare_refit=compare_refit, **SMALL))
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["refit"] == "onepass" and plan["standin"] is True and plan["steps"]
    assert res.summary["export_max_abs_diff"] <= 1e-4 and abs(res.summary["achieved_ratio"] - 0.3) < 0.02
    replay = prune(PruneConfig.from_flat(model=str(src), plan=str(out / "pruning_plan.json"), **SMALL), save=False)
    a, b = res.model.state_dict(), replay.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def fold_sums(m: torch.Tensor, d: torch.Tensor, k: int = 4) -> list[list[torch.Tensor]]:
    """Per-fold ``[M^T M, M^T D, ||D||^2]`` of token rows ``m``, ``d`` ``[N, H]`` (row ``j`` in fold ``j mod k``)."""
    out = []
    for f in range(k):
        mf, df = m[f::k].double(), d[f::k].double()
        out.append([mf.T @ mf, mf.T @ df, (df * df).sum()])
    return out


def test_heldout_error_matches_the_direct_residual():
    g = torch.Generator().manual_seed(0)
    m, d, t = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(8, 8, generator=g)
    mtm, mtd, dtd = fold_sums(m, d, k=1)[0]
    direct = ((m.double() @ t.double() - d.double()) ** 2).sum() / (d.double() ** 2).sum()
    assert heldout_error(t.double(), mtm, mtd, dtd) == pytest.approx(float(direct), rel=1e-9)
    plain = ((m.double() - d.double()) ** 2).sum() / (d.double() ** 2).sum()
    assert heldout_error(None, mtm, mtd, dtd) == pytest.approx(float(plain), rel=1e-9)
    p = torch.randn(8, 8, generator=g).double()  # plain dropping under a prior P: X = P
    at_prior = ((m.double() @ p - d.double()) ** 2).sum() / (d.double() ** 2).sum()
    assert heldout_error(None, mtm, mtd, dtd, p) == pytest.approx(float(at_prior), rel=1e-9)


def test_auto_damping_keeps_plain_dropping_when_the_change_is_unpredictable():
    """The span adds noise unrelated to ``m``: with few tokens any fit only learns the noise, so ``T = I`` wins."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(96, 64, generator=g)
    d = m + torch.randn(96, 64, generator=g)
    fit = choose(fold_sums(m, d), (3, 4), "auto")
    assert fit.x is None and fit.damp is None
    assert fit.scores["identity"] == min(fit.scores.values())


def test_auto_damping_fits_a_predictable_change_and_beats_plain_dropping():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 64, generator=g) * 0.2
    m = torch.randn(4000, 64, generator=g)
    d = m + m @ a + 0.01 * torch.randn(4000, 64, generator=g)
    fit = choose(fold_sums(m, d), (3, 3), "auto")
    assert fit.damp in DAMP_GRID and fit.damp <= 0.01
    assert fit.scores[str(fit.damp)] < 0.01 * fit.scores["identity"]
    torch.testing.assert_close(fit.x.float(), torch.eye(64) + a, atol=2e-3, rtol=0)
    fixed = choose(fold_sums(m, d), (3, 3), 0.5)  # a number is used as given, with no cross-validation
    assert fixed.damp == 0.5 and fixed.scores == {}


def test_a_stand_in_that_raises_the_calibration_loss_is_left_out():
    model, spec, batches = tiny_model("llama_gqa", layers=4), get_spec("llama"), random_batches(seed=6)
    plan = PrunePlan.blocks_only("llama", spec.dims(model.config), [2], criterion="t", target_ratio=0.0,
                                 standin=True, standin_damp=0.01)
    w = compute_weights(model, spec, plan, batches, CPU, progress=False)
    rec = plan.standin_fit[0]
    assert set(rec["calib_kl"]) == {"with", "without"} and rec["kept"] == (1 in w)
    g = torch.Generator().manual_seed(0)
    bad = {1: {"down": torch.randn(64, 96, generator=g) * 5}}  # a "stand-in" that wrecks block 1's MLP
    plan.standin_fit = [{"span": [2, 2]}]
    check_standins(model, spec, plan, bad, {1: None}, batches, CPU)
    rec = plan.standin_fit[0]
    assert bad == {} and rec["kept"] is False and rec["calib_kl"]["with"] > rec["calib_kl"]["without"]


def test_the_exact_stand_in_passes_the_check_and_old_plans_skip_it():
    model, spec, batches = linear_block_model(), get_spec("llama"), random_batches((120, 90, 150, 100), seed=8, vocab=128)
    plan = PrunePlan.blocks_only("llama", spec.dims(model.config), [1], criterion="t", target_ratio=0.0,
                                 standin=True, standin_damp=1e-10)
    w = compute_weights(model, spec, plan, batches, CPU, progress=False)
    rec = plan.standin_fit[0]
    assert 0 in w and rec["kept"] is True and rec["calib_kl"]["with"] < rec["calib_kl"]["without"]
    old = PrunePlan.from_dict({k: v for k, v in plan.to_dict().items() if k not in ("standin_form", "standin_check")})
    assert old.standin_form == "map" and old.standin_check is False
    assert 0 in compute_weights(model, spec, old, batches, CPU, progress=False) and "kept" not in old.standin_fit[0]
