"""The prepared GPU check: Llama-3-8B shapes, random weights, every phase timed (see gpu_check.sh).

    bash benchmarks/gpu_check.sh                  # on a lent H100 / H200: about 6-8 minutes
    bash benchmarks/gpu_check.sh --shape tiny     # anywhere (CPU): seconds; CI runs this so it does not rot

Phases, each with wall time and peak memory (torch's GPU allocator peak within the phase, and
peak RSS): build (random init on the device, bf16 on GPU), calibration batches, a plain forward
over the calibration tokens, AMP scoring with the split search and the one-pass refit at
--ratio (the CLI's defaults), surgery, and export with the reload check. ``scoring / forward``
is the scoring phase's time over the plain forward's on the same tokens. With vLLM importable
(and a GPU, or ``--vllm on``), prefill and decode throughput of the dense and the pruned export
(``--vllm-prompts`` prompts of ``--vllm-prompt-len`` random tokens, ``--vllm-new`` new tokens,
greedy, EOS ignored). Every figure goes to one JSON file: ``$OUT/gpu_check.json`` when ``OUT``
is set, else ``--json``. Needs only torch, transformers, safetensors and tokenizers: no
download, no model files, no lm-eval.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import measure  # noqa: E402
from tiny import char_tokenizer  # noqa: E402  (character-level, no download: ids stay below every vocabulary)

from amp_prune.arch import get_spec  # noqa: E402
from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.io.export import export  # noqa: E402
from amp_prune.io.load import resolve_device  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402
from amp_prune.width.budget import count_params  # noqa: E402
from amp_prune.width.criteria import ScoreContext  # noqa: E402
from amp_prune.width.planner import plan_width  # noqa: E402

SHAPES = {  # Llama-3-8B, and a tiny stand-in with the same structure (GQA 4:1, untied head)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2,
                 num_hidden_layers=4, vocab_size=512, max_position_embeddings=1024),
}


def build(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(**dims, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model


@torch.no_grad()
def plain_forward(model, batches, device: torch.device) -> None:
    for b in batches:
        model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)


def vllm_throughput(path: Path, args, vocab: int) -> dict:
    """Prefill and decode tokens/s of the export at ``path`` through vLLM (greedy, EOS ignored)."""
    from vllm import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(4, min(vocab, 100), (args.vllm_prompt_len,), generator=gen).tolist()}
               for _ in range(args.vllm_prompts)]
    t = time.perf_counter()
    llm = LLM(model=str(path), dtype="bfloat16" if args.dtype == "bfloat16" else "float32",
              max_model_len=args.vllm_prompt_len + args.vllm_new + 8, gpu_memory_utilization=args.vllm_memory,
              enforce_eager=args.vllm_eager, seed=0)
    load_s = time.perf_counter() - t
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], one, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.vllm_new, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    total_s = time.perf_counter() - t
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"load_s": load_s, "prefill_tok_s": args.vllm_prompts * args.vllm_prompt_len / prefill_s,
            "decode_tok_s": max(new - args.vllm_prompts, 1) / max(total_s - prefill_s, 1e-9), "new_tokens": new,
            "generate_s": total_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, help="override the shape's block count")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--vllm", choices=["auto", "on", "off"], default="auto",
                    help="auto: when vLLM imports and a GPU is present")
    ap.add_argument("--vllm-prompts", type=int, default=64)
    ap.add_argument("--vllm-prompt-len", type=int, default=512)
    ap.add_argument("--vllm-new", type=int, default=128)
    ap.add_argument("--vllm-memory", type=float, default=0.4, help="vLLM gpu_memory_utilization")
    ap.add_argument("--vllm-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    ap.add_argument("--json", default="gpu_check.json", help="used when $OUT is not set")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    use_vllm = args.vllm == "on"
    if args.vllm == "auto" and device.type == "cuda":
        try:
            import vllm  # noqa: F401
            use_vllm = True
        except Exception:  # noqa: BLE001 - not installed, or broken: the check runs without it
            use_vllm = False
    out_json = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path(args.json)
    res: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                 f"CPU x{torch.get_num_threads()} threads", "phases": {}}
    ph = res["phases"]

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=1, default=str))

    with measure(ph, "build", device):
        model = build(args.shape, args.layers, device, dtype)
    spec, tok = get_spec("llama"), char_tokenizer()
    res["params_before"] = count_params(model)
    with measure(ph, "calibration batches", device):
        calib, _ = build_batches(tok, num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    res["calibration_tokens"] = sum(b.num_tokens for b in calib)
    with measure(ph, "plain forward", device):
        plain_forward(model, calib, device)
    save()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        dense_dir = Path(tmp) / "dense"
        if use_vllm:
            with measure(ph, "save dense (for vLLM)", device):
                model.save_pretrained(dense_dir)
                tok.save_pretrained(dense_dir)
        with measure(ph, "scoring + split search + one-pass refit", device):
            plan = plan_width(model, spec, calib, ratio=args.ratio, mode="group", criterion="amp",
                              ctx=ScoreContext(device=device, progress=False), attn_units="auto", refit="onepass")
        res["scoring_over_forward"] = ph["scoring + split search + one-pass refit"]["wall_s"] / ph["plain forward"]["wall_s"]
        res["split"] = plan.split
        save()
        with measure(ph, "surgery", device):
            apply_plan(model, plan, spec)
        res["params_after"] = count_params(model)
        res["achieved_ratio"] = 1 - res["params_after"] / res["params_before"]
        pruned_dir = Path(tmp) / "pruned"
        with measure(ph, "export + reload check", device):
            check = export(model, tok, pruned_dir, check_batches=calib[:1], device=device)
        res["export"] = {"class": check.exported_class, "max_abs_diff": check.max_abs_diff, "ok": check.ok}
        save()
        if use_vllm:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            res["vllm"] = {}
            for name, path in (("dense", dense_dir), ("pruned", pruned_dir)):
                res["vllm"][name] = vllm_throughput(path, args, SHAPES[args.shape]["vocab_size"])
                save()
            d, p = res["vllm"]["dense"], res["vllm"]["pruned"]
            res["vllm"]["speedup"] = {k: p[k] / d[k] for k in ("prefill_tok_s", "decode_tok_s")}
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "args"}, indent=1, default=str))
    print(f"written: {out_json}")
    if not res["export"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
