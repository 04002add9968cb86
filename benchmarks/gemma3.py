"""Gemma 3 270M (the second real model): width, depth and hybrid side by side, in one run, one protocol.

    python benchmarks/gemma3.py [--only width depth hybrid] [--json OUT.json]

Every row prunes with the CLI's defaults (64 x 512 C4 calibration) through :func:`amp_prune.prune`
and is measured on WikiText-2 test, 40 windows of 256 tokens, each a BOS and 255 text tokens
(Gemma's tokenizer adds one). Rows:

- width at 0.1 and 0.2 of all parameters and at 0.3 of the decoder blocks (``--ratio-of blocks``),
  each with the refit (the default, weighted by the post-norm's per-token scale) and without;
- depth: 2 and 4 blocks by cka, bi, angular and consensus, each with the stand-in (the default, kept
  only where the calibration KL check prefers it) and without (the same blocks, plainly dropped);
- hybrid at 0.2 of all parameters.

It prints one Markdown table per group; the numbers in docs/results.md come from it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, print_table, save_json, wikitext_text  # noqa: E402

from amp_prune import PruneConfig, apply_plan, load_model, prune  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.io.load import GEMMA_ALIAS  # noqa: E402

CPU = torch.device("cpu")


def wiki_ppl(model, lm, windows) -> float:
    return perplexity(model, lm.spec, windows, CPU, progress=False)


def width_rows(lm, windows) -> list[dict]:
    rows = []
    for ratio, scope in ((0.1, "all"), (0.2, "all"), (0.3, "blocks")):
        for refit in ("onepass", "none"):
            rec: dict = {}
            with measure(rec, "run", CPU):
                res = prune(PruneConfig.from_flat(model=GEMMA_ALIAS, ratio=ratio, ratio_of=scope, refit=refit,
                                                  progress=False), save=False)
            s = res.summary
            chosen = next((c for c in s.get("split", []) if c["chosen"]), None)
            rows.append({"ratio": f"{ratio} of {scope}", "refit": refit, "removed (all)": f"{s['achieved_ratio']:.3f}",
                         "heads/KV": f"{s['heads_after']}/{s['kv_after']}", "channels": s["channels_after"],
                         "split loss": f"{chosen['calib_loss']:.3f}" if chosen else "-",
                         "wikitext2": wiki_ppl(res.model, lm, windows), "s": f"{rec['run']['wall_s']:.0f}"})
            print(rows[-1], flush=True)
    return rows


def depth_rows(lm, windows) -> list[dict]:
    rows = []
    for blocks in (2, 4):
        for criterion in ("cka", "bi", "angular", "consensus"):
            t = time.perf_counter()
            res = prune(PruneConfig.from_flat(model=GEMMA_ALIAS, method="cka", layers=blocks,
                                              layer_criterion=criterion, progress=False), save=False)
            wall = time.perf_counter() - t
            plan = res.plan
            kept = [f for f in plan.standin_fit if f.get("kept", True) and f.get("damp") is not None]
            plain = copy.deepcopy(plan)
            plain.standin, plain.weights = False, None
            fresh = copy.deepcopy(lm.model)
            apply_plan(fresh, plain, lm.spec)
            rows.append({"blocks": blocks, "criterion": criterion, "removed": str(plan.removed_layers),
                         "stand-ins kept": f"{len(kept)} of {len(plan.standin_fit)}",
                         "with stand-in": wiki_ppl(res.model, lm, windows), "plain": wiki_ppl(fresh, lm, windows),
                         "s": f"{wall:.0f}"})
            print(rows[-1], flush=True)
            del fresh, res
    return rows


def hybrid_rows(lm, windows) -> list[dict]:
    t = time.perf_counter()
    res = prune(PruneConfig.from_flat(model=GEMMA_ALIAS, method="hybrid", ratio=0.2, progress=False), save=False)
    s = res.summary
    row = {"ratio": 0.2, "removed blocks": str(s["removed_layers"]), "heads/KV": f"{s['heads_after']}/{s['kv_after']}",
           "channels": s["channels_after"], "removed (all)": f"{s['achieved_ratio']:.3f}",
           "wikitext2": wiki_ppl(res.model, lm, windows), "s": f"{time.perf_counter() - t:.0f}"}
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=("width", "depth", "hybrid"), default=["width", "depth", "hybrid"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model(GEMMA_ALIAS, device="cpu")
    windows = text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=40)
    out: dict = {"dense": wiki_ppl(lm.model, lm, windows)}
    print(f"dense WikiText-2 (40 x 256, BOS first): {out['dense']:.2f}", flush=True)
    if "width" in args.only:
        out["width"] = width_rows(lm, windows)
        print_table(out["width"], list(out["width"][0]))
    if "depth" in args.only:
        out["depth"] = depth_rows(lm, windows)
        print_table(out["depth"], list(out["depth"][0]))
    if "hybrid" in args.only:
        out["hybrid"] = hybrid_rows(lm, windows)
        print_table(out["hybrid"], list(out["hybrid"][0]))
    save_json(args.json, out)


if __name__ == "__main__":
    main()
