"""What the calibration text's domain does to the pruned model: the CLI's defaults, C4 against text in
the evaluation's own format, side by side in one run.

    python benchmarks/wikitext_valid.py /tmp/wt2_valid.jsonl
    python benchmarks/calib_domain.py --calibs builtin:c4 /tmp/wt2_valid.jsonl
    python benchmarks/calib_domain.py --methods width cka --calibs builtin:c4 /tmp/wt2_valid.jsonl

Each method is pruned exactly as ``amp-prune smollm2-135m`` with its defaults would (64 x 512
calibration tokens, the refit and the stand-in as the CLI sets them; the depth search chooses its
blocks on the same text), once per calibration source, and measured on WikiText-2 *test* (40 x 256
tokens, the protocol of docs/results.md). ``width`` is ``--ratio 0.3``; ``cka`` is ``--method cka
--layers 6``; ``hybrid`` is ``--method hybrid --ratio 0.3`` (about 17 minutes per source on 2 cores);
``cka+width`` is the ``cka`` run pruned again with ``--method width`` to 0.3 of the dense model's parameters
in all (two CLI runs, each on the text given; a fixed mix that hybrid's greedy choice can be held against).
The WikiText-2 validation file written by ``benchmarks/wikitext_valid.py`` shares no text with the
test split (only section headings); it measures what text of the evaluation's format does, which is
what a user with data of their target domain gets.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, prune_overrides, save_json, wikitext_text  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402

METHODS = {"width": [dict(method="width", ratio=0.3)], "cka": [dict(method="cka", layers=6)],
           "hybrid": [dict(method="hybrid", ratio=0.3)],
           "cka+width": [dict(method="cka", layers=6), dict(method="width", ratio=0.3)]}


def run_stages(model: str, out: str, calib: str, stages: list[dict], overrides: dict) -> tuple[list, float]:
    """Prune ``model`` by each stage in turn, each on the previous stage's export; a later stage's ``ratio`` is
    of the first model's parameters: r_j = 1 - (1 - ratio) * P_0 / P_(j-1). Returns (results, removed share)."""
    results, src = [], model
    for j, stage in enumerate(stages):
        cfg = dict(stage)
        if results and "ratio" in cfg:
            p0, p_now = results[0].summary["params_before"], results[-1].summary["params_after"]
            cfg["ratio"] = 1 - (1 - cfg["ratio"]) * p0 / p_now
            if cfg["ratio"] <= 0:
                raise SystemExit(f"the earlier stages already removed {1 - p_now / p0:.3f} of the parameters, more "
                                 f"than {stage['ratio']}; drop fewer blocks or ask for a larger ratio")
        results.append(prune(PruneConfig.from_flat(model=src, out=f"{out}-{j}", calib=calib, eval_samples=0,
                                                   progress=False, **{**cfg, **overrides})))
        src = results[-1].out
    return results, 1 - results[-1].summary["params_after"] / results[0].summary["params_before"]


def wikitext_ppl(path: str, windows: int) -> float:
    lm = load_model(path, device="cpu")
    return perplexity(lm.model, lm.spec, text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=windows),
                      torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--calibs", nargs="+", default=["builtin:c4"],
                    help="calibration sources (anything --calib accepts); never the WikiText-2 test text")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--prune", nargs="*", default=[], metavar="KEY=VALUE",
                    help="PruneConfig fields over the CLI defaults for every row, e.g. depth_seq_len=128")
    ap.add_argument("--json")
    args = ap.parse_args()
    overrides = prune_overrides(ap, args.prune)
    rows = [{"method": "dense", "wikitext2 ppl": wikitext_ppl(args.model, args.windows)}]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for i, calib in enumerate(args.calibs):
                t = time.perf_counter()
                results, removed = run_stages(args.model, f"{tmp}/{method}-{i}", calib, METHODS[method], overrides)
                prune_s = time.perf_counter() - t
                fits = [f for r in results for f in r.plan.standin_fit or []]
                label = method + "".join(f" {k}={v}" for k, v in overrides.items())
                rows.append({"method": label, "calibration": Path(calib).name if calib != "builtin:c4" else calib,
                             "removed": round(removed, 3), "blocks": results[0].plan.removed_layers,
                             "split": results[-1].plan.attn_units,
                             "stand-ins kept": f"{sum(bool(f.get('kept')) for f in fits)}/{len(fits)}" if fits else "-",
                             "prune s": round(prune_s, 1),
                             "wikitext2 ppl": wikitext_ppl(results[-1].out, args.windows)})
                print(rows[-1], flush=True)
                save_json(args.json, rows)
    print_table(rows, ["method", "calibration", "removed", "blocks", "stand-ins kept", "prune s", "wikitext2 ppl"])


if __name__ == "__main__":
    main()
