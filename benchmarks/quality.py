"""Zero-shot accuracy and WikiText-2 perplexity of SmolLM2 pruned by every method, at several ratios.

    python benchmarks/quality.py                       # ~1 h 45 min on 2 CPU cores with the defaults
    python benchmarks/quality.py --limit 60 --ppl-windows 4 --ratios 0.1 0.2 0.3

Methods: the width criteria (amp, magnitude, random, and the Wanda-sp-style |W|*||X|| baseline),
the depth methods (cka and consensus block dropping, one iterative search whose removal order
gives every ratio) and hybrid (one search per ratio), each with the CLI's defaults for the
attention/MLP split, the refit and the stand-in (``--attn-units``, ``--refit``, ``--stand-in``). Every pruned model and the dense one are
evaluated with the same settings: lm-eval zero-shot on the five tasks of the usual average
(first --limit examples of each, local copies in shared/data) and WikiText-2 perplexity on the
first --ppl-windows windows of 2048 tokens.

Writes the table into docs/results.md (between the quality markers), the plot to
docs/quality.png and every row to --json (rows already there are reused, so an interrupted
run resumes).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, replace_section  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.depth.cache import depth_batches  # noqa: E402
from amp_prune.depth.hybrid import plan_hybrid  # noqa: E402
from amp_prune.depth.search import plan_depth  # noqa: E402
from amp_prune.eval.harness import evaluate_model  # noqa: E402
from amp_prune.eval.local_tasks import FIVE  # noqa: E402
from amp_prune.io.load import load_model, resolve_device  # noqa: E402
from amp_prune.plan import PrunePlan  # noqa: E402
from amp_prune.refit import compute_weights  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402
from amp_prune.width.budget import count_params  # noqa: E402
from amp_prune.width.criteria import ScoreContext  # noqa: E402
from amp_prune.width.planner import plan_width  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
WIDTH = ("amp", "wanda_sp", "magnitude", "random")
DEPTH = ("cka", "consensus")
START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def evaluate(model, lm, args, device) -> dict:
    res = evaluate_model(model, lm.tokenizer, tasks=list(FIVE), spec=lm.spec, device=device, data_dir=str(args.data_dir),
                         limit=args.limit, batch_size=args.batch_size, ppl="wikitext2", ppl_max_windows=args.ppl_windows,
                         progress=False)
    row = {"avg5": res["avg5"], "avg5_acc": res["avg5_acc"], "ppl": res["wikitext2"]["ppl"]}
    row.update({t: res["tasks"][t].get("acc_norm", res["tasks"][t]["acc"]) for t in FIVE})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=[*WIDTH, *DEPTH, "hybrid"])
    ap.add_argument("--limit", type=int, default=60, help="examples per task (default %(default)s)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--width-samples", type=int, default=32)
    ap.add_argument("--width-seq-len", type=int, default=256)
    ap.add_argument("--depth-samples", type=int, default=16)
    ap.add_argument("--depth-seq-len", type=int, default=128)
    ap.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="benchmarks/quality.json")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md and docs/quality.png")
    ap.add_argument("--attn-units", default="auto", help="width split (default %(default)s, as the CLI)")
    ap.add_argument("--refit", default="onepass", help="width refit (default %(default)s, as the CLI)")
    ap.add_argument("--stand-in", action=argparse.BooleanOptionalAction, default=True,
                    help="depth stand-in (default on, as the CLI)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device)
    dense = lm.model
    total = count_params(dense)
    per_block = count_params(lm.spec.get_layers(dense)[0])
    rows = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
    done = {(r["method"], r["target"]) for r in rows}

    def record(method, target, model, search_s):
        t = time.perf_counter()
        row = {"method": method, "target": target, "removed": 1 - count_params(model) / total, "search s": search_s,
               **evaluate(model, lm, args, device)}
        row["eval s"] = time.perf_counter() - t
        rows.append(row)
        done.add((method, target))
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)

    if ("dense", 0.0) not in done:
        record("dense", 0.0, dense, 0.0)
    width_calib, _ = build_batches(lm.tokenizer, num_samples=args.width_samples, seq_len=args.width_seq_len)
    # as the CLI: the block search runs on a prefix of the calibration, the refit and stand-in on all of it
    depth_calib = depth_batches(width_calib, args.depth_samples, args.depth_seq_len)
    for method in args.methods:
        todo = [r for r in args.ratios if (method, r) not in done]
        if not todo:
            continue
        if method in WIDTH:  # the CLI's width planner with its defaults (auto split, one-pass refit)
            for ratio in todo:
                t = time.perf_counter()
                plan = plan_width(dense, lm.spec, width_calib, ratio=ratio, mode="group", criterion=method,
                                  ctx=ScoreContext(device, progress=False), attn_units=args.attn_units,
                                  refit=args.refit)
                record(method, ratio, apply_plan(copy.deepcopy(dense), plan, lm.spec), time.perf_counter() - t)
        elif method in DEPTH:
            blocks = {r: max(1, round(r * total / per_block)) for r in todo}
            t = time.perf_counter()
            steps = plan_depth(dense, lm.spec, depth_calib, max(blocks.values()), device=device, criterion=method,
                               progress=False).steps
            search_s = time.perf_counter() - t
            order = [b for s in steps for b in s.removed]  # iterative greedy: a prefix is the search for fewer blocks
            for ratio in todo:
                plan = PrunePlan.blocks_only(dense.config.model_type, lm.spec.dims(dense.config),
                                             order[:blocks[ratio]], criterion=method, target_ratio=ratio,
                                             standin=args.stand_in, standin_damp="auto" if args.stand_in else None)
                if plan.needs_weights:
                    plan.weights = compute_weights(dense, lm.spec, plan, width_calib, device, progress=False)
                model = apply_plan(copy.deepcopy(dense), plan, lm.spec)
                record(method, ratio, model, search_s * blocks[ratio] / max(blocks.values()))
        elif method == "hybrid":
            for ratio in todo:
                t = time.perf_counter()
                plan = plan_hybrid(dense, lm.spec, width_calib, ratio, device=device, progress=False,
                                   attn_units=args.attn_units, refit=args.refit, standin=args.stand_in, damp=0.01,
                                   standin_damp="auto", search_batches=depth_calib)
                if plan.needs_weights:
                    plan.weights = compute_weights(dense, lm.spec, plan, width_calib, device, progress=False)
                record("hybrid", ratio, apply_plan(copy.deepcopy(dense), plan, lm.spec), time.perf_counter() - t)
        else:
            raise SystemExit(f"unknown method {method}")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = (f"{args.model}; lm-eval zero-shot, first {args.limit} examples of each task (local copies); "
              f"avg5 = mean of acc_norm (PIQA, HellaSwag, ARC-e, ARC-c) and acc (WinoGrande), in percent; "
              f"WikiText-2 perplexity on the first {args.ppl_windows} windows of 2048 tokens; width calibration "
              f"{args.width_samples} x {args.width_seq_len} tokens (also the refit's and the stand-in's), depth/hybrid "
              f"search on its first {args.depth_samples} x {args.depth_seq_len}; refit {args.refit}, split "
              f"{args.attn_units}, stand-in {'on (damping auto)' if args.stand_in else 'off'}; {where}")
    print("\n" + header + "\n")
    order = {m: i for i, m in enumerate(["dense", *args.methods])}
    rows.sort(key=lambda r: (order.get(r["method"], 99), r["target"]))
    shown = [{**r, "avg5": 100 * r["avg5"], **{t: 100 * r[t] for t in FIVE}} for r in rows]
    table = print_table(shown, ["method", "target", "removed", "avg5", *FIVE, "ppl", "search s", "eval s"])
    if not args.no_docs:
        write_docs(table, header, rows)


def write_docs(table: str, header: str, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = next(r for r in rows if r["method"] == "dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted([(0.0, dense)] + [(r["removed"], r) for r in rows if r["method"] == method], key=lambda p: p[0])
        ax1.plot([100 * x for x, _ in pts], [100 * r["avg5"] for _, r in pts], marker="o", label=method)
        ax2.plot([100 * x for x, _ in pts], [r["ppl"] for _, r in pts], marker="o", label=method)
    ax1.axhline(100 * (0.5 * 2 + 0.25 * 3) / 5, color="grey", ls=":", label="chance")
    ax1.set(xlabel="parameters removed (%)", ylabel="5-task average accuracy (%)", title="zero-shot accuracy")
    ax2.set(xlabel="parameters removed (%)", ylabel="WikiText-2 perplexity (log)", title="perplexity", yscale="log")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "quality.png", dpi=110)
    replace_section(DOCS / "results.md", START, END,
                    f"{header}\n\n{table}\n\n![accuracy and perplexity against ratio](quality.png)",
                    heading="## Zero-shot accuracy and perplexity against ratio\n\n")

if __name__ == "__main__":
    main()
