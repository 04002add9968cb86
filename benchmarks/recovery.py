"""LoRA recovery of SmolLM2 pruned by AMP: WikiText-2 perplexity before and after, and the time.

    python benchmarks/recovery.py --ratio 0.3 --steps 100

Trains on the packaged C4 sample (plain text), which is disjoint from the WikiText-2 test text.
Each model also gets the 5-task zero-shot average (lm-eval on the local copies in shared/data,
first --limit examples per task, the settings of benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, save_json, wikitext_text  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.config import FinetuneConfig
from amp_prune.recover.finetune import finetune  # noqa: E402
from amp_prune.eval.local_tasks import FIVE  # noqa: E402
from amp_prune.eval.harness import evaluate_model  # noqa: E402


def measure(path: str, args) -> tuple[float, float | None]:
    """(WikiText-2 perplexity over windows of 256, 5-task average or None with --limit 0)."""
    lm = load_model(path, device="cpu")
    ppl = perplexity(lm.model, lm.spec, text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=args.windows),
                     torch.device("cpu"))
    if not args.limit:
        return ppl, None
    res = evaluate_model(lm.model, lm.tokenizer, tasks=list(FIVE), spec=lm.spec, data_dir=str(SHARED_DATA),
                         limit=args.limit, batch_size=16, progress=False)
    return ppl, res["avg5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=60, help="examples per task for the 5-task average (0: skip)")
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = prune(PruneConfig.from_flat(model=args.model, ratio=args.ratio, out=f"{tmp}/p", eval_samples=0, progress=False))
        t = time.perf_counter()
        s = finetune(FinetuneConfig(model=pruned.out, data="builtin:c4", out=f"{tmp}/r", steps=args.steps,
                                    batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, progress=False))
        ft_s = time.perf_counter() - t
        dense, before, after = measure(args.model, args), measure(pruned.out, args), measure(f"{tmp}/r", args)

    def pct(x):
        return "" if x is None else f"{100 * x:.2f}"
    rows = [{"model": "dense", "wikitext2 ppl": dense[0], "5-task avg": pct(dense[1])},
            {"model": f"AMP {args.ratio}", "wikitext2 ppl": before[0], "5-task avg": pct(before[1])},
            {"model": f"AMP {args.ratio} + LoRA {args.steps} steps", "wikitext2 ppl": after[0],
             "5-task avg": pct(after[1]), "held-out C4 ppl": f"{s['ppl_before']:.1f} -> {s['ppl_after']:.1f}",
             "fine-tune s": ft_s}]
    print(f"\n{args.model}, CPU; LoRA r=8 alpha=16 lr={args.lr}, {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens of the packaged C4 sample; WikiText-2 test {args.windows} x 256 tokens; 5-task "
          f"average (acc_norm, WinoGrande acc) on the first {args.limit} examples per task\n")
    print_table(rows, ["model", "wikitext2 ppl", "5-task avg", "held-out C4 ppl", "fine-tune s"])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
