"""--gguf: the written file loads back through transformers' own GGUF reader (a second, independent reader) with
the export's perplexity (f16 within 1%, q8_0 within 3%); bad requests are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.arch import get_spec
from amp_prune.errors import AmpPruneError
from amp_prune.eval.perplexity import perplexity, text_windows, wikitext2_text
from amp_prune.io.gguf_export import interleave_rope_rows

CPU = torch.device("cpu")
CALIB = dict(num_samples=8, seq_len=128, eval_samples=0, progress=False)
TOLERANCE = {"f32": 1e-4, "f16": 0.01, "q8_0": 0.03}  # relative perplexity, as the issue states


def test_rope_rows_go_from_halves_to_adjacent_pairs():
    w = torch.arange(2 * 8).reshape(2 * 8, 1).float()  # two heads of 8 rows, row r holds r
    got = interleave_rope_rows(w, 2)[:, 0].long().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_unknown_type_and_unsupported_family_are_refused_before_any_work(tiny_dir, tmp_path, monkeypatch):
    import amp_prune.pipeline as pipeline
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(AmpPruneError, match="unknown --gguf 'q4_0': choose one of f32, f16, bf16, q8_0"):
        prune(PruneConfig.from_flat(model=str(tiny_dir()), gguf="q4_0", out=str(tmp_path / "a")))
    with pytest.raises(AmpPruneError, match="--gguf writes llama, .*gemma3_text; this model is gemma2"):
        prune(PruneConfig.from_flat(model=str(tiny_dir("gemma2")), gguf="f16", out=str(tmp_path / "b")))
    with pytest.raises(AmpPruneError, match="--gguf for gemma3_text carries the tokenizer over from a GGUF input"):
        prune(PruneConfig.from_flat(model=str(tiny_dir("gemma3_text")), gguf="f16", out=str(tmp_path / "c")))
    assert not any(tmp_path.glob("[abc]*"))


@pytest.mark.slow
@pytest.mark.parametrize("case, kind", [("width-group", "f16"), ("width-heads", "q8_0"), ("depth", "f16"),
                                        ("width-group", "f32")])
def test_written_gguf_reloads_in_transformers_with_the_exports_perplexity(case, kind, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip("needs shared/data (WikiText-2)")
    extra = {"width-group": dict(ratio=0.3), "width-heads": dict(ratio=0.3, gqa_mode="heads", attn_units="1"),
             "depth": dict(method="cka", layers=4)}[case]
    out = tmp_path / case
    res = prune(PruneConfig.from_flat(model="smollm2-135m", out=str(out), gguf=kind, **extra, **CALIB))
    path = out / f"model-{kind}.gguf"
    assert path.is_file() and json.loads((out / "run.json").read_text())["summary"]["gguf"] == path.name
    from gguf import GGUFReader
    meta = GGUFReader(str(path)).fields
    s = res.summary
    assert meta["general.description"].contents() == (
        f"pruned by amp-prune ({s['method']}) from smollm2-135m: {s['achieved_ratio']:.1%} of the parameters removed; "
        f"{s['layers_after']} blocks of {s['heads_after']}/{s['kv_after']} heads/KV heads and {s['channels_after']} MLP "
        "channels")
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.num_attention_heads == res.model.config.num_attention_heads
    assert back.config.num_hidden_layers == res.model.config.num_hidden_layers
    windows = text_windows(res.tokenizer, wikitext2_text(str(SHARED_DATA)), 256, max_windows=8)
    want = perplexity(res.model, get_spec(res.model.config.model_type), windows, CPU)
    got = perplexity(back, get_spec(back.config.model_type), windows, CPU)
    assert abs(got / want - 1) <= TOLERANCE[kind], (case, kind, got, want)


def test_a_layout_the_writer_cannot_express_is_refused():
    """RoPE scaling (Llama 3.1's llama3 type) changes every position's rotation, and Gemma 3 27B scales its queries by
    something other than 1/sqrt(head_dim): writing either as plain metadata would run wrong in llama.cpp."""
    from transformers import Gemma3TextConfig, LlamaConfig

    from amp_prune.io.gguf_export import check_gguf_request
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    check_gguf_request("f16", "llama", config=LlamaConfig(**small))
    llama31 = LlamaConfig(**small, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})
    with pytest.raises(AmpPruneError, match=r"--gguf writes plain RoPE; this model's RoPE scaling is \['llama3'\]"):
        check_gguf_request("f16", "llama", config=llama31)
    gemma = dict(small, head_dim=32, num_key_value_heads=1)
    check_gguf_request("f16", "gemma3_text", source_gguf="x.gguf", config=Gemma3TextConfig(**gemma,
                                                                                          query_pre_attn_scalar=32))
    with pytest.raises(AmpPruneError, match=r"scales queries by 1/sqrt\(168\) and llama.cpp by 1/sqrt\(head_dim=32\)"):
        check_gguf_request("f16", "gemma3_text", source_gguf="x.gguf",
                           config=Gemma3TextConfig(**gemma, query_pre_attn_scalar=168))
