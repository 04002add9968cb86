"""Recovery of SmolLM2 pruned at --ratio: LM-loss LoRA against distillation (LoRA and full), at equal steps and tokens.

    python benchmarks/recovery.py --ratio 0.3 --steps 100
    python benchmarks/recovery.py --steps 100 300 --variants kd-lora kd-full

The model is pruned once with the CLI defaults (AMP, auto split, one-pass refit) or the
``--prune KEY=VALUE`` settings given, and every variant starts from that same checkpoint
(``--calib`` is its calibration text, default the CLI's).
Training data is ``--data``: by default the packaged C4 sample (plain text), disjoint from the
WikiText-2 test text the perplexity is measured on (40 x 256 tokens); its first 16 chunks are held
out for the fine-tune's own before/after figure ("held-out ppl"). Each model also gets the 5-task
zero-shot average (lm-eval on the local copies in shared/data, first --limit examples per
task, the settings of benchmarks/quality.py). Rows are printed (and saved) as they finish.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, prune_overrides, save_json, wikitext_text  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from amp_prune.config import DEFAULT_SOURCE, FinetuneConfig  # noqa: E402
from amp_prune.eval.harness import evaluate_model  # noqa: E402
from amp_prune.eval.local_tasks import FIVE  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.recover.finetune import finetune  # noqa: E402

VARIANTS = {  # name -> FinetuneConfig overrides
    "lm-lora": dict(loss="lm"),
    "kd-lora": dict(loss="kd"),
    "kd-full": dict(loss="kd", full=True),
    "kd+lm-lora": dict(loss="kd+lm"),
    # the settings the first table left unmeasured: the LM loss with full fine-tuning, higher learning rates, tau 2
    "lm-full": dict(loss="lm", full=True),
    "lm-full-lr2e-4": dict(loss="lm", full=True, lr=2e-4),
    "lm-lora-lr1e-3": dict(loss="lm", lr=1e-3),
    "kd-lora-t2": dict(loss="kd", temperature=2.0),
    "kd-lora-t4": dict(loss="kd", temperature=4.0),
}
COLUMNS = ["model", "steps", "sequences", "wikitext2 ppl", "5-task avg", "held-out ppl", "KL to dense", "fine-tune s"]


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


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, nargs="+", default=[100])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, help="learning rate of every variant (default: the CLI's per mode)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=60, help="examples per task for the 5-task average (0: skip)")
    ap.add_argument("--calib", default=DEFAULT_SOURCE, help="calibration text of the prune (default: the CLI's)")
    ap.add_argument("--data", default=DEFAULT_SOURCE,
                    help="recovery text (anything `amp-prune finetune --data` accepts); never the WikiText-2 test text")
    ap.add_argument("--prune", nargs="+", default=[], metavar="KEY=VALUE",
                    help="PruneConfig fields for the prune instead of the CLI defaults, e.g. criterion=obs "
                         "refit=sequential num_samples=256 attn_units=0")
    ap.add_argument("--json")
    args = ap.parse_args()
    overrides = prune_overrides(ap, args.prune)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        save_json(args.json, rows)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pruned = prune(PruneConfig.from_flat(model=args.model, ratio=args.ratio, out=f"{tmp}/p", eval_samples=0,
                                             calib=args.calib, progress=False, **overrides))
        prune_s = time.perf_counter() - t
        for name, (ppl, avg) in (("dense", measure(args.model, args)),
                                 (f"pruned {args.ratio}", measure(pruned.out, args))):
            add({"model": name, "wikitext2 ppl": ppl, "5-task avg": pct(avg),
                 "fine-tune s": f"(prune {prune_s:.0f} s)" if name != "dense" else ""})
        for steps in args.steps:
            for name in args.variants:
                out = f"{tmp}/{name}-{steps}"
                t = time.perf_counter()
                s = finetune(FinetuneConfig(model=pruned.out, data=args.data, out=out, steps=steps,
                                            batch_size=args.batch_size, seq_len=args.seq_len, progress=False,
                                            device="cpu", **{"lr": args.lr, "temperature": args.temperature,
                                                             **VARIANTS[name]}))
                ft_s = time.perf_counter() - t
                ppl, avg = measure(out, args)
                kl = f"{s['kl_before']:.3f} -> {s['kl_after']:.3f}" if s.get("kl_before") is not None else ""
                tau = VARIANTS[name].get("temperature", args.temperature)
                add({"model": f"{name} (lr {s['lr']:g}{f', tau {tau:g}' if 'kd' in name else ''})", "steps": steps,
                     "sequences": steps * args.batch_size, "wikitext2 ppl": ppl, "5-task avg": pct(avg),
                     "held-out ppl": f"{s['ppl_before']:.1f} -> {s['ppl_after']:.1f}", "KL to dense": kl,
                     "fine-tune s": ft_s})
    how = " ".join(args.prune) or "CLI defaults"
    print(f"\n{args.model} pruned at {args.ratio} ({how}, calibration {args.calib}), "
          f"CPU {torch.get_num_threads()} threads; "
          f"batches of {args.batch_size} x {args.seq_len} tokens of {args.data}, tau={args.temperature}; "
          f"WikiText-2 test {args.windows} x 256 tokens; 5-task average (acc_norm, WinoGrande acc) on the first "
          f"{args.limit} examples per task\n")
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
