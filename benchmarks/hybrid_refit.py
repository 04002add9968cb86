"""What the refit and the stand-in do to one hybrid plan of SmolLM2, by the calibration data they are fitted on.

    python benchmarks/hybrid_refit.py [--ratio 0.3] [--rows all|default] [--forms down map]

The hybrid search runs once (by default the 6-block budget, 15.8%; 16 x 128 calibration tokens,
as benchmarks/depth.py); only the refit / stand-in and their data then change. ``--rows default``
keeps the rows fitted on the CLI's default calibration (64 x 512) and the unrefit plan. WikiText-2
test, 40 x 256 tokens. Each stand-in row runs once per ``--forms`` entry (what the stand-in fits:
the last kept ``down_proj`` itself, or a folded map; :mod:`amp_prune.depth.standin`). About 8 CPU
minutes at 15.8%, about 20 at 0.3.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, wikitext_text  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.depth.hybrid import plan_hybrid  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.io.load import load_model  # noqa: E402
from amp_prune.refit import compute_weights  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402
from amp_prune.width.budget import count_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=None, help="share of parameters (default: 6 blocks)")
    ap.add_argument("--rows", choices=["all", "default"], default="all")
    ap.add_argument("--forms", nargs="+", choices=["down", "map"], default=["down", "map"],
                    help="stand-in forms of the stand-in rows")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    lm = load_model("smollm2-135m", device="cpu")
    small, _ = build_batches(lm.tokenizer, num_samples=16, seq_len=128)
    default, _ = build_batches(lm.tokenizer, num_samples=64, seq_len=512)  # the CLI default
    wiki = text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=40)
    ratio = args.ratio or 6 * count_params(lm.spec.get_layers(lm.model)[0]) / count_params(lm.model)
    plan = plan_hybrid(lm.model, lm.spec, small, ratio, device=cpu, progress=False, attn_units="auto",
                       refit="onepass", standin=True, damp=0.01)
    choices = "".join(s.choice[0] for s in plan.steps)
    rows = []
    forms = args.forms
    cases = ([("none", None, None), ("onepass", None, small)] + [("onepass", f, small) for f in forms]
             + [("onepass", None, default)] + [("none", f, default) for f in forms]
             + [("onepass", f, default) for f in forms])  # (refit, stand-in form or None, data they are fitted on)
    for refit, form, fit in cases:
        if args.rows == "default" and fit is small:
            continue
        p = copy.deepcopy(plan)
        p.refit, p.standin, p.weights, p.standin_damp = refit, form is not None, None, "auto" if form else None
        if form:
            p.standin_form = form
        if p.needs_weights:
            p.weights = compute_weights(lm.model, lm.spec, p, fit, cpu, progress=False)
        model = apply_plan(copy.deepcopy(lm.model), p, lm.spec)
        rows.append({"plan": f"hybrid {ratio:.3f} {choices}", "refit": refit, "stand-in": form or "none",
                     "fit tokens": sum(b.num_tokens for b in fit) if fit else "",
                     "wikitext2 ppl": perplexity(model, lm.spec, wiki, cpu)})
        print(rows[-1], flush=True)
    print_table(rows, ["plan", "refit", "stand-in", "fit tokens", "wikitext2 ppl"])


if __name__ == "__main__":
    main()
