"""WikiText-2 perplexity of SmolLM2 width-pruned by each criterion, with and without the refit, side by side.

    python benchmarks/width_quality.py --ratios 0.1 0.2 0.3 --windows 40 --seq-len 256

Every row goes through the planner the CLI uses (:func:`amp_prune.width.planner.plan_width`)
on the same calibration batches, and is measured on the same WikiText-2 windows (test rows
joined with "\\n\\n", non-overlapping windows; never used for calibration). Variants:

- ``uniform / none``: the attention share nearest the uniform one, no refit (the rule before the refit);
- ``auto / none`` (AMP): the attention/MLP split chosen by the calibration-loss proxy, no refit;
- ``auto / onepass``, ``auto / sequential``: with the least-squares refit (the uniform split with a
  refit is in the proxy check at ``--proxy-check``).

``--proxy-check R`` also forces every feasible split at ratio ``R`` (AMP, one-pass refit) and prints its
calibration loss (the proxy) beside its held-out perplexity, to validate the proxy; ``--damps`` runs
AMP / auto / one-pass at ``R`` for each damping, to choose the default.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json, wikitext_text  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.io.load import load_model, resolve_device  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402
from amp_prune.width.budget import count_params  # noqa: E402
from amp_prune.width.criteria import ScoreContext  # noqa: E402
from amp_prune.width.planner import plan_width, split_budgets  # noqa: E402

VARIANTS = {"amp": [("uniform", "none"), ("auto", "none"), ("auto", "onepass"), ("auto", "sequential")],
            "wanda_sp": [("uniform", "none"), ("auto", "none"), ("auto", "onepass")],
            "magnitude": [("uniform", "none"), ("auto", "none"), ("auto", "onepass")],
            "obs": [("auto", "none"), ("auto", "onepass"), ("auto", "sequential")]}


def run(lm, calib, wiki, device, *, ratio, crit, split, refit, mode, damp, seed) -> dict:
    t = time.perf_counter()
    plan = plan_width(lm.model, lm.spec, calib, ratio=ratio, mode=mode, criterion=crit, attn_units=split, refit=refit,
                      damp=damp, ctx=ScoreContext(device=device, seed=seed, progress=False))
    plan_s = time.perf_counter() - t
    model = apply_plan(copy.deepcopy(lm.model), plan, lm.spec)
    d = lm.spec.dims(model.config)
    chosen = next(c for c in plan.split if c["chosen"])
    row = {"criterion": crit, "split": split, "refit": refit, "target": ratio, "split losses": {
               c["attn_units"]: round(c["calib_loss"], 4) for c in plan.split if c["calib_loss"] is not None},
           "achieved": 1 - count_params(model) / count_params(lm.model), "heads/kv": f"{d['n_heads']}/{d['n_kv']}",
           "channels": d["intermediate"], "calib loss": chosen["calib_loss"],
           "wikitext2 ppl": perplexity(model, lm.spec, wiki, device), "plan s": plan_s}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    ap.add_argument("--criteria", nargs="+", default=list(VARIANTS))
    ap.add_argument("--mode", default="group")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--proxy-check", type=float, default=0.3)
    ap.add_argument("--damps", type=float, nargs="*", default=[])
    ap.add_argument("--no-sequential", action="store_true", help="skip the (slow) sequential-refit rows")
    ap.add_argument("--sequential-all", action="store_true",
                    help="sequential-refit rows at every ratio (default: the largest ratio only)")
    ap.add_argument("--variants", nargs="*", metavar="SPLIT/REFIT",
                    help="only these variants of each criterion, e.g. auto/onepass auto/sequential")
    ap.add_argument("--attn-units", default="auto",
                    help="force this split (KV groups removed per block) in the variants named 'auto'")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device)
    calib, _ = build_batches(lm.tokenizer, num_samples=args.num_samples, seq_len=args.calib_seq_len, seed=args.seed)
    wiki = text_windows(lm.tokenizer, wikitext_text(), args.seq_len, max_windows=args.windows)
    rows = [{"criterion": "dense", "split": "-", "refit": "-", "target": 0.0, "achieved": 0.0,
             "wikitext2 ppl": perplexity(lm.model, lm.spec, wiki, device)}]
    print(rows[0], flush=True)
    kw = dict(mode=args.mode, damp=args.damp, seed=args.seed)
    for crit in args.criteria if args.ratios else []:
        for ratio in args.ratios:
            for split, refit in VARIANTS[crit]:
                if args.variants and f"{split}/{refit}" not in args.variants:
                    continue
                if split == "auto" and args.attn_units != "auto":
                    split = int(args.attn_units)
                if refit == "sequential" and (args.no_sequential or (ratio != max(args.ratios)
                                                                    and not args.sequential_all)):
                    continue  # three block passes per candidate: measured at the largest ratio only
                rows.append(run(lm, calib, wiki, device, ratio=ratio, crit=crit, split=split, refit=refit, **kw))
    proxy = []
    if args.proxy_check:  # the proxy (calibration loss of every split, from one auto run) against held-out ppl
        auto = plan_width(lm.model, lm.spec, calib, ratio=args.proxy_check, mode=args.mode, criterion="amp",
                          attn_units="auto", refit="onepass", damp=args.damp, ctx=ScoreContext(device, progress=False))
        losses = {c["attn_units"]: c["calib_loss"] for c in auto.split}
        for b in split_budgets(lm.model, lm.spec, args.proxy_check, args.mode):
            proxy.append(run(lm, calib, wiki, device, ratio=args.proxy_check, crit="amp", split=b.attn_units,
                             refit="onepass", **kw))
            proxy[-1]["calib loss"] = losses[b.attn_units]
    damps = []
    for damp in args.damps:
        damps.append(run(lm, calib, wiki, device, ratio=args.proxy_check, crit="amp", split="auto", refit="onepass",
                         **{**kw, "damp": damp}))
        damps[-1]["damp"] = damp
    print(f"\n{args.model}: WikiText-2 test, {sum(b.input_ids.shape[0] for b in wiki)} windows of {args.seq_len} "
          f"tokens; calibration {args.num_samples} x {args.calib_seq_len} tokens of the packaged C4 sample, seed "
          f"{args.seed}; --gqa-mode {args.mode}, damp {args.damp}, --attn-units {args.attn_units}\n")
    cols = ["criterion", "split", "refit", "target", "achieved", "heads/kv", "channels", "calib loss", "wikitext2 ppl",
            "plan s"]
    print_table(rows, cols)
    if proxy:
        print(f"\nproxy check at {args.proxy_check} (AMP, one-pass refit, every split forced):\n")
        print_table(proxy, cols)
    if damps:
        print(f"\ndamping at {args.proxy_check} (AMP, auto split, one-pass refit):\n")
        print_table(damps, ["damp", *cols])
    save_json(args.json, {"rows": rows, "proxy": proxy, "damps": damps})


if __name__ == "__main__":
    main()
