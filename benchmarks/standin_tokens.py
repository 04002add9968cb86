"""The stand-in's form, calibration tokens and damping, on fixed 6-block drops of SmolLM2.

    python benchmarks/standin_tokens.py                      # forms x calibration sizes, CKA's blocks,
                                                             # then every criterion's blocks at the CLI's 64 x 512
    python benchmarks/standin_tokens.py --damps auto 0.01 0.1 --calibs 64x512 --sets cka

The block sets are the ones each criterion drops in ``python benchmarks/depth.py quality`` (6 blocks,
16 x 128 search tokens; docs/results.md), fixed here so that only the stand-in changes: its form
(``down``: the last kept block's ``down_proj`` refit over its inputs; ``map``: ReplaceMe's ``T``
folded into it; ``none``: plain dropping), the data it is fitted on and its damping (``auto``:
cross-validated, see :mod:`amp_prune.depth.standin`; the held-out columns are its 4-fold scores,
of the first span). "spans kept": the spans whose stand-in passed the check against plain
dropping (:func:`amp_prune.refit.check_standins`) out of those with a block to fit. WikiText-2
test, 40 x 256 tokens, as elsewhere; every row in one run, on the same windows.
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
from amp_prune.io.load import load_model  # noqa: E402
from amp_prune.plan import PrunePlan  # noqa: E402
from amp_prune.refit import compute_weights  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402

SETS = {"cka": [13, 14, 15, 16, 17, 18], "bi": [12, 13, 14, 15, 17, 25], "consensus": [13, 14, 15, 16, 17, 25],
        "angular": [3, 12, 13, 14, 17, 25],
        "cka-cli": [5, 7, 12, 16, 17, 25],  # what the CLI's CKA search dropped on its 16 x 128 prefix (until 2026-12-04)
        "cka-cli-64": [13, 15, 16, 17, 25, 26],  # ... and drops on its 16 x 64 prefix, bf16 (the default since)
        "span-8": [8, 9, 10, 11, 12, 13], "span-9": [9, 10, 11, 12, 13, 14]}  # contiguous spans the fit can hurt
DEFAULT_SETS = ["cka", "bi", "consensus", "angular"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forms", nargs="+", choices=["none", "map", "down"], default=["none", "map", "down"])
    ap.add_argument("--damps", nargs="+", default=["auto"], help="stand-in dampings (auto, or numbers)")
    ap.add_argument("--calibs", nargs="+", default=["16x128", "64x256", "64x512"],
                    help="SEQUENCESxTOKENS calibrations for the first set")
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=DEFAULT_SETS,
                    help="block sets; every set after the first runs at the last calibration only")
    ap.add_argument("--calib", default=None,
                    help="the stand-in's calibration text (anything --calib accepts; default: the CLI's C4 sample); "
                         "never the WikiText-2 test text")
    ap.add_argument("--json")
    args = ap.parse_args()
    source = {"source": args.calib} if args.calib else {}
    text = f" {Path(args.calib).name}" if args.calib else ""
    cpu = torch.device("cpu")
    lm = load_model("smollm2-135m", device="cpu")
    wiki = text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=40)
    calibs = [tuple(int(v) for v in c.split("x")) for c in args.calibs]
    runs = [(args.sets[0], c) for c in calibs] + [(s, calibs[-1]) for s in args.sets[1:]]
    built: dict[tuple[int, int], list] = {}
    rows = []
    for name, (n, t) in runs:
        calib = built.setdefault((n, t), build_batches(lm.tokenizer, num_samples=n, seq_len=t, **source)[0])
        for form in args.forms:
            for damp in (["-"] if form == "none" else [d if d == "auto" else float(d) for d in args.damps]):
                plan = PrunePlan.blocks_only("llama", lm.spec.dims(lm.model.config), SETS[name], criterion=name,
                                             target_ratio=0.0, standin=form != "none",
                                             standin_damp=None if form == "none" else damp,
                                             standin_form=form if form != "none" else "down")
                start = time.perf_counter()
                if plan.needs_weights:
                    plan.weights = compute_weights(lm.model, lm.spec, plan, calib, cpu, progress=False)
                fit_s = time.perf_counter() - start
                model = apply_plan(copy.deepcopy(lm.model), plan, lm.spec)
                fit = plan.standin_fit[0] if plan.standin_fit else {}
                scores = fit.get("heldout_unexplained") or {}
                rows.append({"blocks": f"{name} {SETS[name]}", "calibration": f"{n} x {t}{text}",
                             "real tokens": sum(b.num_tokens for b in calib), "form": form,
                             "damp": damp if damp != "auto" else f"auto -> {fit['damp']}",
                             "held-out unexplained": scores.get(str(fit.get("damp")), "-"),
                             "plain dropping": scores.get("identity", "-"), "fit s": round(fit_s, 1),
                             "spans kept": (f"{sum(bool(f.get('kept', f['damp'] is not None)) for f in plan.standin_fit)}"
                                            f"/{len(plan.standin_fit)}") if plan.standin_fit else "-",
                             "wikitext2 ppl": perplexity(model, lm.spec, wiki, cpu)})
                print(rows[-1], flush=True)
    print_table(rows, ["blocks", "calibration", "real tokens", "form", "damp", "held-out unexplained",
                       "plain dropping", "fit s", "spans kept", "wikitext2 ppl"])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
