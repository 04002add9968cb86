"""LoRA recovery of SmolLM2 pruned by AMP: WikiText-2 perplexity before and after, and the time.

    python benchmarks/recovery.py --ratio 0.3 --steps 100

Trains on the packaged C4 sample (plain text), which is disjoint from the WikiText-2 test text.
The 5-task lm-eval average is not measured here yet (it needs the offline evaluation of issue 4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json, wikitext_text  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from amp_prune.evaluation import perplexity, text_windows  # noqa: E402
from amp_prune.finetune import FinetuneConfig, finetune  # noqa: E402


def wiki_ppl(path: str, windows: int, seq_len: int) -> float:
    lm = load_model(path, device="cpu")
    return perplexity(lm.model, lm.spec, text_windows(lm.tokenizer, wikitext_text(), seq_len, max_windows=windows),
                      torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = prune(PruneConfig(model=args.model, ratio=args.ratio, out=f"{tmp}/p", eval_samples=0, progress=False))
        t = time.perf_counter()
        s = finetune(FinetuneConfig(model=pruned.out, data="builtin:c4", out=f"{tmp}/r", steps=args.steps,
                                    batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, progress=False))
        ft_s = time.perf_counter() - t
        dense = wiki_ppl(args.model, args.windows, 256)
        before, after = wiki_ppl(pruned.out, args.windows, 256), wiki_ppl(f"{tmp}/r", args.windows, 256)
    rows = [{"model": "dense", "wikitext2 ppl": dense},
            {"model": f"AMP {args.ratio}", "wikitext2 ppl": before},
            {"model": f"AMP {args.ratio} + LoRA {args.steps} steps", "wikitext2 ppl": after,
             "held-out C4 ppl": f"{s['ppl_before']:.1f} -> {s['ppl_after']:.1f}", "fine-tune s": ft_s}]
    print(f"\n{args.model}, CPU; LoRA r=8 alpha=16 lr={args.lr}, {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens of the packaged C4 sample; WikiText-2 test {args.windows} x 256 tokens\n")
    print_table(rows, ["model", "wikitext2 ppl", "held-out C4 ppl", "fine-tune s"])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
