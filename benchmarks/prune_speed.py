"""Wall time and peak memory of scoring, the refit, the split search, surgery and export, separately.

The scoring phases all use the planner of the CLI (:func:`plan_width`) on the same batches:
``scoring`` (uniform split, no refit), ``scoring + one-pass refit`` (the Gram statistics ride in the
same pass), ``scoring + sequential refit`` and ``scoring + split search + one-pass refit`` (the default).

    python benchmarks/prune_speed.py                       # SmolLM2-135M on CPU
    python benchmarks/prune_speed.py --shape llama3-8b --device cuda --dtype bfloat16   # random Llama-3-8B shapes

Peak RSS is sampled during each phase (it includes the model already in memory); peak GPU
memory is torch's allocator peak within the phase.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, print_table, save_json  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.io.export import export  # noqa: E402
from amp_prune.io.load import LoadedModel, load_model, resolve_device, resolve_dtype  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402
from amp_prune.width.criteria import ScoreContext  # noqa: E402
from amp_prune.width.planner import plan_width  # noqa: E402


def random_llama3_8b(device: torch.device, dtype: torch.dtype, layers: int) -> LoadedModel:
    """Llama-3-8B shapes (hidden 4096, 32/8 heads, 14336 channels), random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from amp_prune.arch import get_spec
    from amp_prune.io.load import demo_model_dir
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(demo_model_dir())  # any tokenizer: ids stay < the vocab
    return LoadedModel(model=model, tokenizer=tok, spec=get_spec("llama"), source="random-llama3-8b", path=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=["llama3-8b"], help="use a random model of these shapes instead of --model")
    ap.add_argument("--layers", type=int, default=32, help="layers of the random --shape model")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--skip-variants", action="store_true", help="time only the default (split search + refit)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rec: dict = {}
    with measure(rec, "load", device):
        lm = random_llama3_8b(device, dtype, args.layers) if args.shape else load_model(args.model, device=device,
                                                                                         dtype=dtype)
    calib, _ = build_batches(lm.tokenizer, num_samples=args.num_samples, seq_len=args.seq_len,
                             batch_size=args.batch_size)
    ctx = ScoreContext(device=device, progress=False)
    phases = [("scoring", "uniform", "none"), ("scoring + one-pass refit", "uniform", "onepass"),
              ("scoring + sequential refit", "uniform", "sequential"),
              ("scoring + split search + one-pass refit", "auto", "onepass")]
    for name, split, refit in phases if not args.skip_variants else phases[-1:]:
        with measure(rec, name, device):
            plan = plan_width(lm.model, lm.spec, calib, ratio=args.ratio, mode="group", criterion="amp", ctx=ctx,
                              attn_units=split, refit=refit)
    with measure(rec, "surgery", device):
        apply_plan(lm.model, plan, lm.spec)
    with tempfile.TemporaryDirectory() as tmp, measure(rec, "export", device):
        export(lm.model, lm.tokenizer, Path(tmp) / "out", check_batches=calib[:1], device=device, spec=lm.spec)
    tokens = sum(b.num_tokens for b in calib)
    name = f"random {args.shape} ({args.layers} layers)" if args.shape else args.model
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{name}, {gpu}, {dtype}, calibration {args.num_samples} x {args.seq_len} ({tokens} real tokens), "
          f"ratio {args.ratio}, {time.strftime('%Y-%m-%d')}\n")
    base = rec.get("scoring", {}).get("wall_s")
    rows = [{"phase": k, "wall s": v["wall_s"], "peak RSS MiB": v["peak_rss_mb"],
             "vs scoring": f"{v['wall_s'] / base:.2f}x" if base and k.startswith("scoring") else "",
             **({"peak GPU MiB": v["peak_gpu_mb"]} if "peak_gpu_mb" in v else {})} for k, v in rec.items()]
    print_table(rows, ["phase", "wall s", "vs scoring", "peak RSS MiB"]
                + (["peak GPU MiB"] if device.type == "cuda" else []))
    save_json(args.json, {"args": vars(args), "phases": rec})


if __name__ == "__main__":
    main()
