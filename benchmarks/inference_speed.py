"""Prefill and decode throughput of SmolLM2, dense against pruned, on the same prompts.

    python benchmarks/inference_speed.py                 # CPU: ~3 minutes (two ratios)
    python benchmarks/inference_speed.py --device cuda --dtype bfloat16

Speed depends only on the shapes, not on which units were removed, so the pruned models here
are cut with the seeded random criterion: width (heads and channels, --gqa-mode group) at each
ratio, and depth (whole blocks, evenly spaced) at the same parameter budget. Prefill: one
forward over --batch prompts of --prompt-len tokens. Decode: greedy generation of --new-tokens
tokens with the KV cache after a --prompt-len prompt, batch 1 and --batch. Median of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json, wikitext_text  # noqa: E402

from amp_prune.width.criteria import ScoreContext, random_scores  # noqa: E402
from amp_prune.surgery import remove_blocks  # noqa: E402
from amp_prune.io.load import load_model, resolve_device, resolve_dtype  # noqa: E402
from amp_prune.width.budget import compute_budget, count_params
from amp_prune.width.planner import make_plan  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speeds(model, prompts: torch.Tensor, args, device) -> dict:
    model.eval()
    b, t = prompts.shape
    prefill = timed(lambda: model(input_ids=prompts, use_cache=False), device, args.repeats)
    row = {"prefill tok/s": b * t / prefill}
    for batch in (1, b):
        ids = prompts[:batch]
        gen = timed(lambda ids=ids: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                   do_sample=False, pad_token_id=0), device, args.repeats)
        one_step = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), device, args.repeats)
        # decode throughput: generated tokens over the generation time minus its prompt forward
        row[f"decode tok/s (batch {batch})"] = batch * args.new_tokens / max(gen - one_step, 1e-9)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    dense = lm.model
    ids = torch.tensor(lm.tokenizer(wikitext_text(), add_special_tokens=False)["input_ids"][:args.batch * args.prompt_len])
    prompts = ids.view(args.batch, args.prompt_len).to(device)
    total, per_block = count_params(dense), count_params(lm.spec.get_layers(dense)[0])
    n_layers = len(lm.spec.get_layers(dense))
    base = speeds(dense, prompts, args, device)
    rows = [{"model": "dense", "params": total, **base}]
    print(rows[-1], flush=True)
    scores = random_scores(dense, lm.spec, [], ScoreContext(device, seed=0, progress=False))
    for ratio in args.ratios:
        width = copy.deepcopy(dense)
        apply_plan(width, make_plan(width, lm.spec, scores, compute_budget(width, lm.spec, ratio, "group"),
                                    mode="group", criterion="random", ratio=ratio), lm.spec)
        depth = copy.deepcopy(dense)
        k = max(1, round(ratio * total / per_block))
        remove_blocks(depth, lm.spec, sorted({round(i * n_layers / k) for i in range(k)}))
        for name, model in ((f"width {ratio}", width), (f"depth {ratio} ({k} blocks)", depth)):
            rows.append({"model": name, "params": count_params(model), **speeds(model, prompts, args, device)})
            print(rows[-1], flush=True)
        del width, depth
    for r in rows:
        for key in list(base):
            r[key.replace("tok/s", "x")] = r[key] / base[key]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model}, {next(dense.parameters()).dtype}, {where}; prefill {args.batch} x {args.prompt_len} tokens; "
          f"decode {args.new_tokens} new tokens after a {args.prompt_len}-token prompt; median of {args.repeats}\n")
    print_table(rows, ["model", "params", *base, *(k.replace("tok/s", "x") for k in base)])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
