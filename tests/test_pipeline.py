"""The pipeline's stages: every infeasible request is refused before the first forward pass, every method is a
planner that leaves the model alone, and a normal run raises no warning of ours."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import SHARED_DATA
from tiny import tiny_model

import amp_prune.pipeline as pipeline
from amp_prune import PLANNERS, PruneConfig, prune
from amp_prune.calib.blockwise import BlockInputs
from amp_prune.checks import Inputs, check_model
from amp_prune.errors import AmpPruneError
from amp_prune.io.load import load_model

SMALL = dict(num_samples=4, seq_len=32, eval_samples=2, batch_size=2, progress=False)


@pytest.fixture
def no_forward(monkeypatch):
    """Fail the test if any decoder block runs: the request had to be refused before that."""
    def boom(*_a, **_k):
        raise AssertionError("a forward pass ran before the request was refused")
    monkeypatch.setattr(pipeline, "calibrate", boom)
    monkeypatch.setattr(pipeline, "measure", boom)
    monkeypatch.setattr(torch.nn.Module, "__call__", boom)


@pytest.mark.parametrize("case, match", [
    (dict(ratio=0.97), "the blocks can give at most"),
    (dict(ratio=0.2, attn_units="7"), "--attn-units 7 cannot meet"),
    (dict(ratio=0.97, method="cka"), "at most 2 of 3 can be dropped"),
    (dict(method="cka", layers=3), "--layers must be between 1 and 2"),
    (dict(ratio=0.99, method="hybrid"), "can give at most"),
    (dict(eval_tasks="piqa,nosuchtask", data_dir=str(SHARED_DATA)), "unknown task 'nosuchtask'"),
    (dict(eval_tasks="piqa", data_dir="/nonexistent"), "is not a directory"),
    (dict(bias_check="nosuch"), "--bias-check"),
    (dict(calib="/nonexistent/calib.txt"), "calibration file not found"),
    (dict(eval_text="/nonexistent/held.txt"), "--eval-text file not found"),
])
def test_infeasible_requests_are_refused_before_any_forward(tiny_dir, tmp_path, case, match, no_forward):
    d = tiny_dir()
    if "data_dir" in case and case["data_dir"] == str(SHARED_DATA) and not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not present")
    with pytest.raises(AmpPruneError, match=match):
        prune(PruneConfig.from_flat(model=str(d), out=str(tmp_path / "o"), **{**SMALL, **case}))
    assert not (tmp_path / "o").exists()


def _plan_file(tmp_path, model_dir, **case) -> str:
    out = tmp_path / "made"
    prune(PruneConfig.from_flat(model=str(model_dir), out=str(out), **{**SMALL, **case}))
    return str(out / "pruning_plan.json")


def test_a_plan_for_another_model_is_refused_before_any_forward(tiny_dir, tmp_path, monkeypatch):
    plan = _plan_file(tmp_path, tiny_dir("qwen2"))
    other = tiny_dir("qwen3")
    same_type = tmp_path / "wider"  # same family, other dims
    model = tiny_model("qwen2")
    model.config.intermediate_size = 80
    type(model)(model.config).save_pretrained(same_type)
    (same_type / "tokenizer.json").write_bytes((tiny_dir("qwen2") / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir("qwen2") / f).exists():
            (same_type / f).write_bytes((tiny_dir("qwen2") / f).read_bytes())
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(AmpPruneError, match="made for a qwen2 model, this model is qwen3"):
        prune(PruneConfig.from_flat(model=str(other), plan=plan, out=str(tmp_path / "o1"), **SMALL))
    with pytest.raises(AmpPruneError, match="plan was made for a model with"):
        prune(PruneConfig.from_flat(model=str(same_type), plan=plan, out=str(tmp_path / "o2"), **SMALL))


@pytest.mark.parametrize("method, extra", [("width", {}), ("width", {"gqa_mode": "heads"}), ("cka", {"layers": 1}),
                                           ("cka", {"layers": 1, "layer_criterion": "consensus"}),
                                           ("hybrid", {"ratio": 0.4})])
def test_every_planner_returns_a_plan_and_leaves_the_model(tiny_dir, method, extra):
    lm = load_model(str(tiny_dir()), device="cpu")
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = lm.model.config.to_dict()
    config = PruneConfig.from_flat(model="x", method=method, **{**SMALL, **extra})
    calib, _ = pipeline.calibrate(config, lm.tokenizer)
    job = check_model(config, lm, Inputs(), torch.device("cpu"))
    plan = PLANNERS[method](lm.model, calib, job)
    assert plan.method == method and plan.layers
    now = lm.model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert lm.model.config.to_dict() == cfg


def test_a_normal_run_raises_no_warning_of_ours(tiny_dir, tmp_path):
    """transformers 5 warns when the block runner passes both past_key_values and cache; we pass neither."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, method in enumerate(("width", "cka", "hybrid")):
            prune(PruneConfig.from_flat(model=str(tiny_dir()), method=method, out=str(tmp_path / f"o{i}"),
                                        **({"layers": 1} if method == "cka" else {}), **SMALL))
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, [str(w.message) for w in ours]


def test_block_runner_passes_no_cache_arguments(tiny_dir):
    from amp_prune.calib.blockwise import capture_inputs
    from amp_prune.calib.data import to_batches
    lm = load_model(str(tiny_dir()), device="cpu")
    (inputs,) = capture_inputs(lm.model, lm.spec, to_batches([[5, 6, 7, 8]], 1, 3), torch.device("cpu"))
    assert isinstance(inputs, BlockInputs)
    assert all(not {"cache", "past_key_values", "past_key_value", "use_cache"} & set(kw) for kw in inputs.layer_kwargs)


def test_run_json_keeps_the_flat_config_keys(tiny_dir, tmp_path):
    out = tmp_path / "o"
    prune(PruneConfig.from_flat(model=str(tiny_dir()), out=str(out), **SMALL))
    run = json.loads((out / "run.json").read_text())
    flat = run["config"]
    assert flat["num_samples"] == 4 and flat["criterion"] == "amp" and flat["gqa_mode"] == "group"
    assert PruneConfig.from_flat(**flat).to_dict() == flat  # the record rebuilds the same config


@pytest.mark.parametrize("method, extra, expect", [("cka", dict(layers=1), 64),
                                                   ("cka", dict(layers=1, depth_seq_len=16), 16),
                                                   ("width", dict(ratio=0.2), None)])
def test_run_json_records_the_search_tokens_that_ran(tiny_dir, tmp_path, method, extra, expect):
    """--depth-seq-len unset is resolved per method before the run, so run.json says what the search used."""
    out = tmp_path / "o"
    prune(PruneConfig.from_flat(model=str(tiny_dir()), out=str(out), method=method, **extra, **SMALL))
    assert json.loads((out / "run.json").read_text())["config"]["depth_seq_len"] == expect


def test_a_refit_from_too_few_calibration_tokens_is_noted(tiny_dir):
    from amp_prune.refit import refit_token_notes
    assert refit_token_notes({"intermediate": 96}, 384) == []
    assert "overfit" in refit_token_notes({"intermediate": 96}, 383)[0]
    src = str(tiny_dir())
    few = prune(PruneConfig.from_flat(model=src, ratio=0.3, **SMALL), save=False)  # 4 x 32 tokens, 96 inputs
    assert any("calibration tokens" in n for n in few.summary["notes"])
    plain = prune(PruneConfig.from_flat(model=src, ratio=0.3, refit="none", **SMALL), save=False)
    enough = prune(PruneConfig.from_flat(model=src, ratio=0.3, **{**SMALL, "num_samples": 16}), save=False)
    assert not any("calibration tokens" in n for n in plain.summary["notes"] + enough.summary["notes"])


def test_a_runner_that_disagrees_with_the_stock_forward_stops_the_run(tiny_dir, tmp_path, monkeypatch):
    """Once per run the runner's logits are compared with the model's own forward, before any planning."""
    import amp_prune.calib.blockwise as blockwise
    right = blockwise.block_forward
    monkeypatch.setattr(blockwise, "block_forward", lambda layer, i, s: right(layer, i, s) + (0.1 if i == 2 else 0))
    monkeypatch.setitem(pipeline.PLANNERS, "width", lambda *a: pytest.fail("planning ran"))
    with pytest.raises(RuntimeError, match="block runner's logits differ from LlamaForCausalLM's own forward"):
        prune(PruneConfig.from_flat(model=str(tiny_dir()), out=str(tmp_path / "o"), **SMALL))
    assert not (tmp_path / "o").exists()


def test_ratio_of_blocks_removes_that_share_of_the_decoder_blocks(tiny_dir, tmp_path):
    d = tiny_dir("gemma3_text")
    res = prune(PruneConfig.from_flat(model=str(d), ratio=0.3, ratio_of="blocks", **SMALL), save=False)
    s = res.summary
    assert s["ratio_of"] == "blocks" and abs(s["achieved_block_ratio"] - 0.3) <= 0.02, s["achieved_block_ratio"]
    assert s["achieved_ratio"] < s["achieved_block_ratio"]  # the embeddings are not in the blocks' share
    lm = load_model(str(d), device="cpu")
    share = sum(p.numel() for p in lm.model.model.layers.parameters()) / sum(p.numel() for p in lm.model.parameters())
    assert s["achieved_ratio"] == pytest.approx(s["achieved_block_ratio"] * share)


def test_the_summary_says_where_a_ratio_of_all_fell_on_an_embedding_heavy_model():
    from amp_prune.report import format_summary
    base = {"method": "width", "target_ratio": 0.3, "achieved_ratio": 0.3, "ratio_of": "all", "params_before": 10,
            "params_after": 7, "heads_before": 4, "kv_before": 1, "heads_after": 1, "kv_after": 1, "layers_before": 18,
            "layers_after": 18, "channels_before": 2048, "channels_after": 233, "ppl_before": 30.0, "ppl_after": 562.6}
    heavy = format_summary({**base, "achieved_block_ratio": 0.80}, {}, None)  # Gemma 3 270M's default run
    assert "removed 30.00% of all parameters (target 30%), which is 80% of the decoder blocks'" in heavy, heavy
    light = format_summary({**base, "achieved_block_ratio": 0.36}, {}, None)  # SmolLM2's
    assert "of the decoder blocks'" not in light, light


@pytest.mark.parametrize("case", [dict(ratio=0.97), dict(ratio=0.97, method="cka"), dict(ratio=0.99, method="hybrid")])
def test_infeasible_ratio_names_the_ceiling_under_both_scopes(tiny_dir, tmp_path, case, no_forward):
    with pytest.raises(AmpPruneError) as err:
        prune(PruneConfig.from_flat(model=str(tiny_dir()), out=str(tmp_path / "o"), **{**SMALL, **case}))
    msg = str(err.value)
    assert "of all parameters, --ratio-of all;" in msg and "of the decoder blocks', --ratio-of blocks)" in msg, msg


def test_ratio_of_with_layers_is_refused():
    with pytest.raises(AmpPruneError, match="--ratio-of applies to --ratio"):
        PruneConfig.from_flat(model="m", method="cka", layers=2, ratio_of="blocks").validate()
