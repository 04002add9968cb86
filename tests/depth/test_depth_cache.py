"""The block search's prefix cache: placement, its size estimate, the incremental update, the token cap
and the bounded rescoring."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batches
from tiny import tiny_model

from amp_prune.arch import get_spec
from amp_prune.calib.blockwise import capture_inputs, run_blocks
from amp_prune.config import DepthConfig
from amp_prune.depth.cache import choose_placement, depth_batches, estimate_bytes, tokens_of
from amp_prune.depth.search import BoundedRescore, DepthSearch, angle, plan_depth
from amp_prune.errors import AmpPruneError

CPU = torch.device("cpu")


def _model(layers=6):
    return tiny_model("llama_gqa", layers=layers), get_spec("llama")


def test_estimate_is_what_a_full_device_cache_holds():
    model, spec = _model()
    batches = random_batches()
    search = DepthSearch(model, spec, batches, CPU, placement="device", progress=False)
    cache = search.prefix_pass()
    d = spec.dims(model.config)
    est = estimate_bytes(batches, d["n_layers"], d["hidden"], torch.float32)
    assert est == (d["n_layers"] + 1) * tokens_of(batches) * d["hidden"] * 4
    assert cache.stored_bytes() == est


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_off_device_placements_hold_the_same_bytes_and_recompute_holds_only_the_final_states(placement):
    model, spec = _model()
    batches = random_batches()
    d = spec.dims(model.config)
    est = estimate_bytes(batches, d["n_layers"], d["hidden"], torch.float32)
    full = DepthSearch(model, spec, batches, CPU, placement=placement, progress=False).prefix_pass()
    assert full.stored_bytes() >= est  # disk adds the safetensors headers
    assert full.stored_bytes() < est * 1.1
    low = DepthSearch(model, spec, batches, CPU, placement="recompute", progress=False).prefix_pass()
    assert low.stored_bytes() == est // (d["n_layers"] + 1)
    full.close()


def test_auto_placement_follows_the_estimate():
    assert choose_placement("auto", 1, CPU) == "device"
    assert choose_placement("auto", 10 ** 18, CPU) == "disk"
    assert choose_placement("cpu", 10 ** 18, CPU) == "cpu"
    with pytest.raises(AmpPruneError, match="--depth-cache"):
        choose_placement("gpu", 1, CPU)


@pytest.mark.parametrize("placement", ["device", "disk", "recompute"])
def test_incremental_update_after_a_removal_equals_a_fresh_prefix_pass(placement):
    model, spec = _model()
    search = DepthSearch(model, spec, random_batches(), CPU, placement=placement, progress=False)
    cache = search.prefix_pass()
    search.set_reference(cache)
    for k in (3, 5, 0):  # a middle block, the last one, the first one
        search.removed.add(k)
        cache = search.advance(cache, k)
        fresh = search.prefix_pass()
        assert list(cache) == list(fresh) == [*search.alive, 6]
        for i in fresh:
            if fresh.has_states(i):
                for a, b in zip(cache[i], fresh[i]):
                    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
        assert sorted(cache.changes) == sorted(fresh.changes) == search.alive
        for i, v in fresh.changes.items():
            assert cache.changes[i] == pytest.approx(v, rel=1e-9)


def test_token_cap_keeps_exactly_the_first_states_of_each_sequence():
    model, spec = _model()
    batches = random_batches()
    cut = depth_batches(batches, 4, 16)
    assert sum(b.input_ids.shape[0] for b in cut) == 4 and max(b.input_ids.shape[1] for b in cut) == 16
    assert depth_batches(batches, None, None) is batches and depth_batches(batches, 99, 999) is batches
    full = run_blocks(model, spec, capture_inputs(model, spec, batches, CPU), CPU, progress=False)
    short = run_blocks(model, spec, capture_inputs(model, spec, cut, CPU), CPU, progress=False)
    rows_full = [(s.hidden[r], s.mask[r]) for s in full for r in range(s.hidden.shape[0])][:4]
    rows_short = [(s.hidden[r], s.mask[r]) for s in short for r in range(s.hidden.shape[0])]
    for (hf, mf), (hs, ms) in zip(rows_full, rows_short):
        n = int(ms.sum())
        assert n == min(16, int(mf.sum()))
        torch.testing.assert_close(hs[:n], hf[:n], rtol=1e-5, atol=1e-5)


def test_depth_flags_are_checked():
    for bad in (dict(depth_cache="gpu"), dict(rescore="some"), dict(depth_samples=-1), dict(depth_seq_len=4)):
        with pytest.raises(AmpPruneError):
            DepthConfig(**bad).validate()


def test_bounded_rescoring_with_an_infinite_margin_rescores_everything_and_equals_the_exact_search():
    model, spec = _model(layers=8)
    exact = plan_depth(model, spec, random_batches(), 4, device=CPU, rescore="all", progress=False)
    wide = plan_depth(model, spec, random_batches(), 4, device=CPU, rescore="bounded", margin=math.inf,
                      progress=False)
    assert wide.removed_layers == exact.removed_layers
    for a, b in zip(exact.steps, wide.steps):
        assert b.metrics["cka"] == pytest.approx(a.metrics["cka"], rel=1e-9)
        assert b.rescored in (None, b.candidates)
        assert a.rescored is None


def test_bounded_rescoring_skips_candidates_whose_lower_bound_cannot_win():
    search = type("S", (), {})()
    search.alive, search.progress = [0, 1, 2], False
    scored = []
    search.cka_of = lambda cache, i: scored.append(i) or {0: 0.9, 1: 0.5, 2: 0.95}[i]
    b = BoundedRescore(margin=1.0)
    b.record({0: 0.9, 1: 0.5, 2: 0.95})
    # angles: 0.451, 1.047, 0.318. After a drift of 0.15, block 0's lower bound (0.301) is below the best
    # fresh angle (block 2's 0.318), so it is rescored; block 1's (0.897) is not
    b.moved(0.15)
    scores, rescored = b.rescore(search, None, "t")
    assert rescored == [0, 2] and scored == [2, 0]
    assert scores["cka"][1] == pytest.approx(0.5)
    assert angle(float("nan")) == pytest.approx(math.pi / 2)


def test_the_default_bounded_search_records_what_it_rescored_and_the_drift():
    model, spec = _model(layers=8)
    plan = plan_depth(model, spec, random_batches(), 3, device=CPU, progress=False)
    assert plan.steps[0].rescored is None and len(plan.steps[0].metrics["cka"]) == 8
    for st in plan.steps[1:]:
        assert st.rescored and set(st.rescored) <= set(st.candidates)
        assert st.removed[0] in st.rescored
    assert all(st.drift is not None and st.drift >= 0 for st in plan.steps[:-1])


@pytest.mark.parametrize("method, given, expect", [("cka", None, 64), ("hybrid", None, 128), ("hybrid", 32, 32),
                                                   ("cka", 0, 200)])
def test_the_search_tokens_default_by_method(method, given, expect):
    """--depth-seq-len unset: 64 tokens for the CKA search, 128 for hybrid (measured per method); a value wins."""
    from types import SimpleNamespace

    from amp_prune.calib.data import Batch
    from amp_prune.config import PruneConfig
    from amp_prune.planners import _search_batches
    cfg = PruneConfig.from_flat(model="m", method=method, ratio=0.3, layers=None, depth_seq_len=given,
                                depth_samples=0)
    cfg.validate()
    calib = [Batch(torch.ones(2, 200, dtype=torch.long), torch.ones(2, 200, dtype=torch.long))]
    cut = _search_batches(calib, SimpleNamespace(config=cfg))
    assert {b.input_ids.shape[1] for b in cut} == {expect}
