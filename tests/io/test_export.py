"""Export round trip: plain from_pretrained / pipeline reload with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, random_batches
from test_surgery import build_plan, logits
from tiny import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, pipeline

from amp_prune.errors import AmpPruneError
from amp_prune.io.export import export
from amp_prune.surgery import apply_plan

CPU = torch.device("cpu")


def pruned(family, mode="heads"):
    model = tiny_model(family)
    plan = build_plan(model, mode)
    apply_plan(model, plan)
    return model, plan


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_logits_and_pipeline(family, tmp_path):
    model, plan = pruned(family)
    out = tmp_path / "out"
    check = export(model, char_tokenizer(), out, check_batches=random_batches()[:1], device=CPU,
                   files={"pruning_plan.json": plan.to_dict()})
    assert check.ok and check.max_abs_diff == 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain, no trust_remote_code
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_attention_heads"] == model.config.num_attention_heads
    assert cfg["intermediate_size"] == model.config.intermediate_size
    assert cfg["head_dim"] == plan.dims["head_dim"]
    for b in random_batches(seed=2):
        mask = b.attention_mask.bool()
        assert torch.equal(logits(model, b)[mask], logits(reloaded, b)[mask])
    gen = pipeline("text-generation", model=str(out), device="cpu")
    got = gen("hello", max_new_tokens=4, min_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = gen.tokenizer("hello", return_tensors="pt").input_ids
    want = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=3)[0].tolist()
    assert len(want) == prompt.shape[1] + 4 and list(got) == want  # new tokens, the in-memory model's greedy ones
    assert json.loads((out / "pruning_plan.json").read_text())["layers"][0]["heads"] == plan.layers[0].heads
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_llama_head_count_rejected_by_llamaconfig_exports_as_mistral(tmp_path):
    model, _ = pruned("llama_gqa", "heads")  # 8 -> 6 query heads, hidden 64: 64 % 6 != 0
    assert model.config.hidden_size % model.config.num_attention_heads != 0
    check = export(model, char_tokenizer(), tmp_path / "m", check_batches=random_batches()[:1], device=CPU)
    assert check.exported_class == "MistralForCausalLM" and check.ok
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(reloaded).__name__ == "MistralForCausalLM"
    b = random_batches(seed=3)[0]
    mask = b.attention_mask.bool()
    torch.testing.assert_close(logits(model, b)[mask], logits(reloaded, b)[mask], atol=1e-5, rtol=0)


def test_existing_out_refused_and_overwrite_replaces(tmp_path):
    model, _ = pruned("qwen3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(AmpPruneError, match="already exists"):
        export(model, char_tokenizer(), out, check_batches=random_batches()[:1], device=CPU)
    assert (out / "keep.txt").read_text() == "user data"
    export(model, char_tokenizer(), out, check_batches=random_batches()[:1], device=CPU, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_write_over_the_input_model(tmp_path, tiny_dir):
    src = tiny_dir("llama_gqa")
    model, _ = pruned("llama_gqa", "group")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir())
    with pytest.raises(AmpPruneError, match="input model"):
        export(model, char_tokenizer(), src, check_batches=random_batches()[:1], device=CPU, overwrite=True,
               input_path=str(src))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir()) == before


def test_export_check_runs_each_models_own_forward(tmp_path):
    """The check compares the in-memory model's stock forward with the reloaded one's, not the block runner with
    itself: a difference only the model's own forward shows (here 0.5 on every logit) is refused."""
    model = tiny_model("gemma3_text")
    own = model.forward

    def drifted(*args, **kwargs):
        out = own(*args, **kwargs)
        out.logits = out.logits + 0.5
        return out

    model.forward = drifted
    with pytest.raises(AmpPruneError, match=r"differs from the in-memory model \(max \|diff\| 0\.5"):
        export(model, char_tokenizer(), tmp_path / "out", check_batches=random_batches()[:1], device=CPU)
    assert list(tmp_path.iterdir()) == []
