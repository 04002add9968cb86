"""WikiText-2 perplexity of SmolLM2 pruned by each criterion and GQA mode, at several ratios.

    python benchmarks/width_quality.py --ratios 0.1 0.2 0.3 --windows 40 --seq-len 256

Scores are computed once per criterion (they do not depend on the ratio or the mode); each
(criterion, mode, ratio) is then planned and applied to a fresh copy of the dense model.
Perplexity: WikiText-2 test rows joined with "\\n\\n", non-overlapping windows.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json, wikitext_text  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.config import CRITERIA
from amp_prune.width.criteria import ScoreContext, get_criterion  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.io.load import load_model, resolve_device  # noqa: E402
from amp_prune.width.budget import compute_budget, count_params
from amp_prune.width.planner import make_plan  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    ap.add_argument("--modes", nargs="+", default=["group", "heads"])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device)
    dense = lm.model
    calib, _ = build_batches(lm.tokenizer, num_samples=args.num_samples, seq_len=args.calib_seq_len, seed=args.seed)
    wiki = text_windows(lm.tokenizer, wikitext_text(), args.seq_len, max_windows=args.windows)
    total = count_params(dense)
    t = time.perf_counter()
    rows = [{"criterion": "dense", "mode": "-", "target": 0.0, "achieved": 0.0,
             "wikitext2 ppl": perplexity(dense, lm.spec, wiki, device)}]
    print(f"dense perplexity {rows[0]['wikitext2 ppl']:.2f} ({time.perf_counter() - t:.0f}s)", flush=True)
    for crit in args.criteria:
        t = time.perf_counter()
        scores = get_criterion(crit)(dense, lm.spec, calib, ScoreContext(device=device, seed=args.seed, progress=False))
        score_s = time.perf_counter() - t
        for mode in args.modes:
            for ratio in args.ratios:
                model = copy.deepcopy(dense)
                budget = compute_budget(model, lm.spec, ratio, mode)
                apply_plan(model, make_plan(model, lm.spec, scores, budget, mode=mode, criterion=crit, ratio=ratio))
                d = lm.spec.dims(model.config)
                row = {"criterion": crit, "mode": mode, "target": ratio, "achieved": 1 - count_params(model) / total,
                       "heads/kv": f"{d['n_heads']}/{d['n_kv']}", "channels": d["intermediate"],
                       "wikitext2 ppl": perplexity(model, lm.spec, wiki, device), "scoring s": score_s}
                rows.append(row)
                print(row, flush=True)
                del model
    print(f"\n{args.model}: WikiText-2 test, {sum(b.input_ids.shape[0] for b in wiki)} windows of {args.seq_len} "
          f"tokens; calibration {args.num_samples} x {args.calib_seq_len} tokens of the packaged C4 "
          f"sample, seed {args.seed}\n")
    print_table(rows, ["criterion", "mode", "target", "achieved", "heads/kv", "channels", "wikitext2 ppl"])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
