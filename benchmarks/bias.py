"""bias_probe on SmolLM2, dense and AMP-pruned at 0.3: COMPAS (race) and DecodingTrust adult (sex).

    python benchmarks/bias.py                      # ~20 minutes on 2 CPU cores
    python benchmarks/bias.py --compas-limit 300 --adult-limit 200

Both mitigations are computed from the same forward passes (the aggregation is the only
difference), so they can be compared item for item. Writes docs/fairness.md (the tables
between the markers), docs/fairness.png and every report to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, replace_section  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from bias_probe import load, run_probe  # noqa: E402
from bias_probe.metrics import aggregate  # noqa: E402
from bias_probe.probe import binary_measures  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
START, END = "<!-- bias:start -->", "<!-- bias:end -->"
KEYS = ("statistical_parity_difference", "equal_opportunity_difference", "equalized_odds_difference",
        "positive_probability_gap", "accuracy")
SHORT = {"statistical_parity_difference": "SPD", "equal_opportunity_difference": "EOD",
         "equalized_odds_difference": "EqOdds", "positive_probability_gap": "P-gap", "accuracy": "acc"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--compas-limit", type=int, default=300)
    ap.add_argument("--adult-limit", type=int, default=200)
    ap.add_argument("--min-group-size", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default="benchmarks/bias.json")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    sets = [load("compas", "race", data_dir=SHARED_DATA, limit=args.compas_limit),
            load("adult", "sex", data_dir=SHARED_DATA, limit=args.adult_limit)]
    dense = load_model(args.model, device="cpu")
    models = [("dense", dense.model)]
    pruned = prune(PruneConfig.from_flat(model=args.model, ratio=args.ratio, num_samples=32, seq_len=256, eval_samples=0,
                               progress=False), save=False)
    models.append((f"AMP {args.ratio}", pruned.model))
    rows, reports = [], []
    for data in sets:
        for name, model in models:
            rep, records = run_probe(model, dense.tokenizer, data, mitigation="mean", batch_size=args.batch_size,
                                     min_group_size=args.min_group_size, progress=False)
            majority = binary_measures(records, args.min_group_size,
                                       preds_after=[aggregate(list(r["probs"].values()), "majority") for r in records])
            reports.append({"model": name, "report": rep, "majority_after": majority["after"]})
            row = {"dataset": f"{data.name} ({data.attribute})", "model": name, "items": rep["n_items"],
                   "flip rate": rep["flip_rate"], "mean P shift": rep["mean_positive_shift"],
                   "max P shift": rep["max_positive_shift"]}
            for k in KEYS:
                row[f"{SHORT[k]} before"] = rep["before"][k]
                row[f"{SHORT[k]} mean"] = rep["after"][k]
                row[f"{SHORT[k]} majority"] = majority["after"][k]
            row["s"] = rep["seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    cols = ["dataset", "model", "items", "flip rate", "mean P shift", "max P shift",
            *[f"{SHORT[k]} {w}" for k in KEYS for w in ("before", "mean", "majority")], "s"]
    header = (f"{args.model} on CPU (fp32), dense and AMP-pruned at {args.ratio} (calibration 32 x 256); COMPAS: a "
              f"seeded sample of {args.compas_limit} people, attribute race, six variants each; adult: "
              f"{args.adult_limit} DecodingTrust items (base rate 0.5), attribute sex; groups with fewer than "
              f"{args.min_group_size} items are left out of SPD/EOD/EqOdds. 'mean' and 'majority' are the two "
              "mitigations, computed from the same forward passes.")
    print("\n" + header + "\n")
    table = print_table(rows, cols)
    if not args.no_docs:
        write_docs(header, table, reports)


def write_docs(header: str, table: str, reports: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(3.2 * len(reports), 3.6), sharey=True)
    for ax, rep in zip(axes, reports):
        r = rep["report"]
        names = list(r["before"]["per_group"])
        before = [r["before"]["per_group"][n]["positive_rate"] for n in names]
        after = [r["after"]["per_group"][n]["positive_rate"] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after (mean)")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{r['dataset']}, {rep['model']}", fontsize=9)
    axes[0].set_ylabel("positive prediction rate")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "fairness.png", dpi=110)
    replace_section(DOCS / "fairness.md", START, END,
                    f"{header}\n\n{table}\n\n![per-group positive rate before and after](fairness.png)",
                    new_file="# Fairness: bias_probe results\n\n")

if __name__ == "__main__":
    main()
