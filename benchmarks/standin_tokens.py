"""The stand-in against the number of calibration tokens and the damping, on a fixed 6-block drop of SmolLM2.

    python benchmarks/standin_tokens.py

The blocks are the ones ``--method cka --layers 6`` drops (13-18, see docs/results.md); only the
data the linear map ``T`` is fitted on and its damping change (``auto``: cross-validated,
see :mod:`amp_prune.depth.standin`; the held-out columns are its 4-fold scores). WikiText-2 test, 40 x 256 tokens, as elsewhere.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, wikitext_text  # noqa: E402

from amp_prune.calib.data import build_batches  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.io.load import load_model  # noqa: E402
from amp_prune.plan import PrunePlan  # noqa: E402
from amp_prune.refit import compute_weights  # noqa: E402
from amp_prune.surgery import apply_plan  # noqa: E402

BLOCKS = [13, 14, 15, 16, 17, 18]


def main() -> None:
    cpu = torch.device("cpu")
    lm = load_model("smollm2-135m", device="cpu")
    wiki = text_windows(lm.tokenizer, wikitext_text(), 256, max_windows=40)
    rows = []
    for n, t in [(16, 128), (64, 256), (64, 512)]:
        calib, _ = build_batches(lm.tokenizer, num_samples=n, seq_len=t)
        for damp in (["auto", 0.01, 0.1, 1.0] if n == 16 else ["auto", 0.01, 0.1]):
            plan = PrunePlan.blocks_only("llama", lm.spec.dims(lm.model.config), BLOCKS, criterion="cka",
                                         target_ratio=0.0, standin=True, standin_damp=damp)
            plan.weights = compute_weights(lm.model, lm.spec, plan, calib, cpu, progress=False)
            model = apply_plan(copy.deepcopy(lm.model), plan, lm.spec)
            fit = plan.standin_fit[0]
            rows.append({"calibration": f"{n} x {t}", "real tokens": sum(b.num_tokens for b in calib),
                         "damp": damp if damp != "auto" else f"auto -> {fit['damp']}",
                         "held-out unexplained": (fit["heldout_unexplained"] or {}).get(str(fit["damp"]), "-"),
                         "plain dropping": (fit["heldout_unexplained"] or {}).get("identity", "-"),
                         "wikitext2 ppl": perplexity(model, lm.spec, wiki, cpu)})
            print(rows[-1], flush=True)
    print_table(rows, ["calibration", "real tokens", "damp", "held-out unexplained", "plain dropping", "wikitext2 ppl"])


if __name__ == "__main__":
    main()
