"""Real pretrained model #2: Gemma 3 270M (base; one KV head, head_dim 256, sliding and full layers), from PyPI.

Sequences here are longer than its 512-token sliding window, where a runner that handed every block
block 0's mask and RoPE base was off by up to 19 logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from amp_prune import PruneConfig, prune
from amp_prune.errors import AmpPruneError
from amp_prune.eval.perplexity import text_windows, wikitext2_text

pytestmark = pytest.mark.slow
LONG = 700  # tokens: beyond the sliding window
SMALL = dict(num_samples=8, seq_len=640, eval_samples=2, batch_size=4, progress=False)


@pytest.fixture(scope="session")
def gemma_dir():
    from amp_prune.io.load import GEMMA_ALIAS, alias_model_dir
    try:
        return alias_model_dir(GEMMA_ALIAS)
    except AmpPruneError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def long_text_ids(gemma_dir):
    """One WikiText-2-like window of LONG tokens, BOS first (the local rows when shared/data is here)."""
    from conftest import SHARED_DATA
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    text = wikitext2_text(str(SHARED_DATA)) if SHARED_DATA.is_dir() else " ".join(["The quick brown fox."] * 400)
    (window,) = text_windows(tok, text, LONG, max_windows=1, batch_size=1)
    return window.input_ids


def stock(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_runner_equals_the_stock_forward_beyond_the_window(gemma_dir, long_text_ids):
    from amp_prune.calib.data import Batch
    from amp_prune.eval.agreement import runner_logit_diff
    from amp_prune.io.load import load_model
    lm = load_model(str(gemma_dir), device="cpu")
    assert lm.model.config.layer_types[5] == "full_attention" and lm.model.config.sliding_window == 512
    diff = runner_logit_diff(lm.model, lm.spec, [Batch(long_text_ids, torch.ones_like(long_text_ids))],
                             torch.device("cpu"))
    assert diff < 1e-3, diff


def _check_export(res, out, long_text_ids):
    assert res.summary["exported_class"] == "Gemma3ForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(stock(reloaded, long_text_ids), stock(res.model, long_text_ids), atol=1e-4, rtol=0)
    return reloaded


def test_width_channels_at_0_1_exports_a_gemma3_that_pipeline_runs(gemma_dir, tmp_path, long_text_ids):
    out = tmp_path / "g-w10"
    res = prune(PruneConfig.from_flat(model=str(gemma_dir), ratio=0.1, attn_units="0", out=str(out), **SMALL))
    s = res.summary
    assert abs(s["achieved_ratio"] - 0.1) <= 0.005 and s["heads_after"] == 4 and s["channels_after"] < 2048
    assert s["ppl_after"] < 10 * s["ppl_before"]
    _check_export(res, out, long_text_ids)
    gen = pipeline("text-generation", model=str(out), device="cpu")
    got = gen("The capital of France is", max_new_tokens=5, min_new_tokens=5, do_sample=False,
              return_tensors=True)[0]["generated_token_ids"]
    prompt = gen.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = res.model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0].tolist()
    assert list(got) == want


def nll(model, ids) -> float:
    return torch.nn.functional.cross_entropy(stock(model, ids)[:-1].double(), ids[0, 1:]).item()


def test_heads_mode_keeps_a_head_count_gemma3_can_express(gemma_dir, tmp_path, long_text_ids):
    """...and its --gguf f16 file (from the alias, whose GGUF carries the tokenizer) reads back through transformers'
    own GGUF reader with the export's perplexity within 1% (on the 700-token window)."""
    from amp_prune.io.load import GEMMA_ALIAS
    out = tmp_path / "g-heads"
    res = prune(PruneConfig.from_flat(model=GEMMA_ALIAS, ratio=0.1, gqa_mode="heads", attn_units="2", gguf="f16",
                                      out=str(out), **SMALL))
    assert res.summary["heads_after"] == 2  # 4 heads, 1 KV head: 3 would not divide hidden 640
    _check_export(res, out, long_text_ids)
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    assert (back.config.num_attention_heads, back.config.head_dim) == (2, 256)
    want, got = nll(res.model, long_text_ids), nll(back, long_text_ids)
    assert abs(math.exp(got - want) - 1) <= 0.01, (got, want)
    with pytest.raises(AmpPruneError, match="can keep only 4, 2 or 1 query heads per block"):
        prune(PruneConfig.from_flat(model=str(gemma_dir), ratio=0.1, attn_units="1", out=str(tmp_path / "x"),
                                    **SMALL))


def test_depth_two_blocks_keeps_every_layer_type_in_place(gemma_dir, tmp_path, long_text_ids):
    out = tmp_path / "g-d2"
    res = prune(PruneConfig.from_flat(model=str(gemma_dir), method="cka", layers=2, out=str(out), **SMALL))
    gone = res.summary["removed_layers"]
    dense_types = json.loads((gemma_dir / "config.json").read_text())["layer_types"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 16 and len(gone) == 2
    assert cfg["layer_types"] == [t for i, t in enumerate(dense_types) if i not in gone]
    _check_export(res, out, long_text_ids)
