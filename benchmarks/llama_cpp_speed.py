"""Decode speed and q8_0 perplexity in llama.cpp and in transformers, dense against pruned, the same exports.

    .venv-gguf/bin/python benchmarks/llama_cpp_speed.py [--kind f32] [--new-tokens 128] [--repeats 3]

Runs in the venv `make test-gguf` builds (llama-cpp-python). SmolLM2 dense and the CLI's width 0.3
and 6-block depth exports (each written with --gguf), 2 threads, greedy decoding of --new-tokens
tokens after each of three prompts; tokens/s is the decode rate (llama.cpp's eval of one token at a
time after the prompt; transformers' generate with its KV cache, less the prompt's forward), the
median of --repeats runs. Perplexity: WikiText-2 test, 8 windows of 256 tokens, of the export in
transformers (fp32) and of its q8_0 GGUF in llama.cpp (f32 KV cache), with the GGUF written by the
same writer for the dense model too, so the dense row shows what llama.cpp's q8_0 costs before pruning.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

from amp_prune import PruneConfig, prune  # noqa: E402
from amp_prune.eval.perplexity import text_windows, wikitext2_text  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MODELS = {"dense": None, "AMP width 0.3": dict(ratio=0.3), "depth, 6 blocks": dict(method="cka", layers=6)}


def cpp_rate(path: Path, tok, new: int, repeats: int) -> float:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=2, seed=0)
    rates = []
    for _ in range(repeats):
        total_t, total_n = 0.0, 0
        for p in PROMPTS:
            llm.reset()
            llm.eval(tok(p)["input_ids"])
            t = time.perf_counter()
            for _ in range(new):
                llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
            total_t += time.perf_counter() - t
            total_n += new
        rates.append(total_n / total_t)
    return statistics.median(rates)


def windows(tok) -> list[list[int]]:
    return [row for b in text_windows(tok, wikitext2_text(str(SHARED_DATA) if SHARED_DATA.is_dir() else None), 256,
                                      max_windows=8) for row in b.input_ids.tolist()]


def cpp_ppl(path: Path, rows: list[list[int]]) -> float:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=0, type_v=0)  # GGML_TYPE_F32: the KV cache adds no error of its own
    nll, n = 0.0, 0
    for row in rows:
        llm.reset()
        llm.eval(row)
        logits = np.array(llm.scores[: len(row)], dtype=np.float64)
        lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll -= lp[np.arange(len(row) - 1), row[1:]].sum()
        n += len(row) - 1
    return float(np.exp(nll / n))


@torch.no_grad()
def hf_ppl(folder: Path, rows: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for row in rows:
        lp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].double(), -1)
        nll -= lp[torch.arange(len(row) - 1), torch.tensor(row[1:])].sum().item()
        n += len(row) - 1
    return float(np.exp(nll / n))


@torch.no_grad()
def hf_rate(folder: Path, tok, new: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rates = []
    for _ in range(repeats):
        total_t, total_n = 0.0, 0
        for p in PROMPTS:
            ids = torch.tensor([tok(p)["input_ids"]])
            t = time.perf_counter()
            model(input_ids=ids)
            prompt_t = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            total_t += time.perf_counter() - t - prompt_t
            total_n += new
        rates.append(total_n / total_t)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="f32", choices=("f32", "f16", "q8_0"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from amp_prune.io.gguf_export import gguf_for_dir
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in MODELS.items():
            out = Path(tmp) / label.replace(" ", "-").replace(",", "")
            if kw is None:  # the dense model, written by the same writer with nothing removed
                from amp_prune.io.gguf_export import write_gguf
                from amp_prune.io.load import alias_gguf, load_model
                lm = load_model("smollm2-135m", device="cpu")
                out.mkdir(parents=True)
                lm.model.save_pretrained(out)
                lm.tokenizer.save_pretrained(out)
                for kind in {args.kind, "q8_0"}:
                    write_gguf(lm.model, lm.tokenizer, out / f"model-{kind}.gguf", kind,
                               source_gguf=Path(alias_gguf("smollm2-135m", None)))
                tok, params = lm.tokenizer, sum(p.numel() for p in lm.model.parameters())
            else:
                res = prune(PruneConfig.from_flat(model="smollm2-135m", out=str(out), gguf=args.kind, progress=False,
                                                  **kw))
                tok, params = res.tokenizer, res.summary["params_after"]
                if args.kind != "q8_0":
                    gguf_for_dir(out, "q8_0")
            rows_ = windows(tok)
            ppl_hf, ppl_cpp = hf_ppl(out, rows_), cpp_ppl(out / "model-q8_0.gguf", rows_)
            cpp = cpp_rate(out / f"model-{args.kind}.gguf", tok, args.new_tokens, args.repeats)
            hfr = hf_rate(out, tok, args.new_tokens, args.repeats)
            base = base or {"cpp": cpp, "hf": hfr}
            rows.append({"model": label, "parameters": f"{params / 1e6:.1f}M",
                         f"llama.cpp {args.kind}": f"{cpp:.1f} tok/s ({cpp / base['cpp']:.2f}x)",
                         "transformers fp32": f"{hfr:.1f} tok/s ({hfr / base['hf']:.2f}x)",
                         "ppl transformers fp32": f"{ppl_hf:.2f}", "ppl llama.cpp q8_0": f"{ppl_cpp:.2f}",
                         "q8_0 / fp32": f"{ppl_cpp / ppl_hf:.3f}"})
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
