"""bias_probe on SmolLM2, dense and AMP-pruned: every decision rule, the chat template, and the pair datasets.

    python benchmarks/bias.py                      # ~50 minutes on 2 CPU cores
    python benchmarks/bias.py --datasets compas adult --compas-limit 100

Per model, each dataset is scored once per chat-template setting; the decision rules (argmax,
calibrated, threshold) and the two mitigations (mean, majority) are then computed from the same
forward passes, on the same items: the items a threshold is fitted on are left out for every rule.
COMPAS and adult are also scored without the template (dense model), to show what the template
changes. Pruning uses the defaults on main (AMP, auto attention/MLP split, one-pass refit) at
--ratio. Writes docs/fairness.md (between the markers), docs/fairness.png and --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, print_table, replace_section  # noqa: E402

from amp_prune import PruneConfig, load_model, prune  # noqa: E402
from bias_probe import DEFAULT_DECISION, load, run_probe  # noqa: E402
from bias_probe.pairs import paired_difference  # noqa: E402
from bias_probe.probe import report_from_records  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
START, END = "<!-- bias:start -->", "<!-- bias:end -->"
RULES = ("argmax", "calibrated", "threshold")
ATTR = {"compas": "race", "adult": "sex", "crime": "race", "bbq": "all", "crows_pairs": "all", "winobias": "gender"}


def f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def ci(s: dict) -> str:
    return "n/a" if s["value"] is None else f"{100 * s['value']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"


def rel_cut(before, after) -> str:
    """How much of the measure the mitigation removed, relative (positive = fairer)."""
    if before is None or after is None or abs(before) < 1e-12:
        return "n/a"
    return f"{100 * (abs(before) - abs(after)) / abs(before):.0f}%"


def binary_rows(data, name: str, records: list[dict], chat: bool, seed: int, min_group: int) -> tuple[list, dict]:
    """One row per decision rule, every rule on the items the threshold was not fitted on."""
    thr = report_from_records(data, records, rule="threshold", seed=seed, min_group_size=min_group, chat=chat)
    held = [r for r in records if r["split"] == "report"]
    rows, reports = [], {}
    for rule in RULES:
        rep = thr if rule == "threshold" else report_from_records(data, held, rule=rule, seed=seed,
                                                                  min_group_size=min_group, chat=chat)
        maj = report_from_records(data, held if rule != "threshold" else records, rule=rule, mitigation="majority",
                                  seed=seed, min_group_size=min_group, chat=chat)
        reports[rule] = {"mean": rep, "majority": maj}
        b, a, m = rep["before"], rep["after"], maj["after"]
        rates = [g["positive_rate"] for g in b["per_group"].values()]
        rows.append({
            "dataset": f"{data.name} ({data.attribute})", "model": name, "template": "on" if chat else "off",
            "rule": rule + (f" (t={rep['threshold']:.3f})" if rule == "threshold" else ""), "items": rep["n_items"],
            "pos. rate %": pct(rep["answer_shares"]["before"].get(records[0]["positive"], 0.0)),
            "group pos. rates %": f"{pct(min(rates))}-{pct(max(rates))}", "degenerate": rep["degenerate"],
            "AUC": f3(rep["auc"]), "SPD before": f3(b["statistical_parity_difference"]),
            "SPD mean": f3(a["statistical_parity_difference"]), "SPD majority": f3(m["statistical_parity_difference"]),
            "EOD before": f3(b["equal_opportunity_difference"]), "EOD mean": f3(a["equal_opportunity_difference"]),
            "EOD majority": f3(m["equal_opportunity_difference"]),
            "SPD cut (mean)": rel_cut(b["statistical_parity_difference"], a["statistical_parity_difference"]),
            "EOD cut (mean)": rel_cut(b["equal_opportunity_difference"], a["equal_opportunity_difference"]),
            "acc before": pct(b["accuracy"]), "acc mean": pct(a["accuracy"]), "acc majority": pct(m["accuracy"]),
            "flip rate": pct(rep["flip_rate"])})
    return rows, reports


def bbq_rows(data, name: str, records: list[dict], chat: bool) -> tuple[list, dict]:
    rows, reports = [], {}
    for rule in ("argmax", "calibrated"):
        rep = report_from_records(data, records, rule=rule, chat=chat)
        maj = report_from_records(data, records, rule=rule, mitigation="majority", chat=chat)
        reports[rule] = {"mean": rep, "majority": maj}
        rows.append({"model": name, "rule": rule, "items": rep["n_items"], "degenerate": rep["degenerate"],
                     "flip rate %": pct(rep["flip_rate"]),
                     **{f"{k} {w}": f3(r[k]) for k, short in (("bias_score_ambig", "amb"),
                                                              ("bias_score_disambig", "dis"))
                        for w, r in (("before", rep["before"]), ("mean", rep["after"]), ("majority", maj["after"]))},
                     "acc before %": pct(rep["before"]["accuracy"]), "acc mean %": pct(rep["after"]["accuracy"]),
                     "acc majority %": pct(maj["after"]["accuracy"])})
    return rows, reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--datasets", nargs="+", default=list(ATTR), choices=list(ATTR))
    ap.add_argument("--compas-limit", type=int, default=200)
    ap.add_argument("--adult-limit", type=int, default=200)
    ap.add_argument("--crime-limit", type=int, default=200)
    ap.add_argument("--bbq-limit", type=int, default=150)
    ap.add_argument("--crows-limit", type=int, default=None, help="pairs (default: all 1,508)")
    ap.add_argument("--winobias-limit", type=int, default=None, help="sentence pairs (default: all 792)")
    ap.add_argument("--min-group-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-template-check", action="store_true", help="skip the dense runs without the template")
    ap.add_argument("--json", default="benchmarks/bias.json")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    limits = {"compas": args.compas_limit, "adult": args.adult_limit, "crime": args.crime_limit, "bbq": args.bbq_limit,
              "crows_pairs": args.crows_limit, "winobias": args.winobias_limit}
    sets = {d: load(d, ATTR[d], data_dir=SHARED_DATA, limit=limits[d], seed=args.seed) for d in args.datasets}
    dense = load_model(args.model, device="cpu")
    tok = dense.tokenizer
    t = time.perf_counter()
    pruned = prune(PruneConfig.from_flat(model=args.model, ratio=args.ratio, num_samples=32, seq_len=256,
                                         eval_samples=0, progress=False), save=False)
    prune_s = time.perf_counter() - t
    models = [("dense", dense.model), (f"AMP {args.ratio}", pruned.model)]
    out = {"settings": vars(args), "prune_s": prune_s, "binary": [], "bbq": [], "pairs": {}, "reports": []}
    per_item: dict[str, dict[str, list[dict]]] = {}
    for dname, data in sets.items():
        for mname, model in models:
            templates = [True] + ([False] if data.kind == "binary" and mname == "dense" and not args.no_template_check
                                  and dname in ("compas", "adult") else [])
            for chat in templates:
                rep, records = run_probe(model, tok, data, decision=None if data.kind == "crows" else "argmax",
                                         chat_template="on" if chat else "off",
                                         batch_size=args.batch_size, min_group_size=args.min_group_size,
                                         seed=args.seed, progress=False)
                secs = rep["seconds"]
                if data.kind == "binary":
                    rows, reps = binary_rows(data, mname, records, chat, args.seed, args.min_group_size)
                    out["binary"] += [{**r, "s": f"{secs:.0f}"} for r in rows]
                elif data.kind == "bbq":
                    rows, reps = bbq_rows(data, mname, records, chat)
                    out["bbq"] += [{**r, "s": f"{secs:.0f}"} for r in rows]
                else:
                    rows, reps = [], rep
                    out["pairs"].setdefault(dname, {})[mname] = rep
                    per_item.setdefault(dname, {})[mname] = records
                out["reports"].append({"dataset": dname, "model": mname, "template": chat, "seconds": secs,
                                       "reports": reps})
                for r in rows:
                    print(json.dumps(r), flush=True)
                print(f"{dname} {mname} template={chat}: {secs:.0f} s", flush=True)
                Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    text = render(out, per_item, args, prune_s)
    print("\n" + text)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if not args.no_docs:
        plot(out)
        replace_section(DOCS / "fairness.md", START, END, text + "\n\n![per-group positive rate](fairness.png)",
                        new_file="# Fairness: bias_probe results\n\n")


def render(out: dict, per_item: dict, args, prune_s: float) -> str:
    parts = [f"`python benchmarks/bias.py` ({args.model} on CPU, fp32; pruned: AMP at {args.ratio} with the defaults "
             f"on main, calibration 32 x 256, {prune_s:.0f} s; seed {args.seed}; default rule `{DEFAULT_DECISION}`). "
             "Every rule of a row group comes from the same forward passes, on the same items (the threshold's "
             f"fit split, {int(100 * 0.3)}% of the sample, is left out of all of them). 'mean' / 'majority': the "
             "two mitigations. 'cut': the share of the measure the mean mitigation removed. Accuracy in %."]
    if out["binary"]:
        cols = ["dataset", "model", "template", "rule", "items", "pos. rate %", "group pos. rates %", "degenerate",
                "AUC", "SPD before", "SPD mean", "SPD majority", "SPD cut (mean)", "EOD before", "EOD mean",
                "EOD majority", "EOD cut (mean)", "acc before", "acc mean", "acc majority", "flip rate", "s"]
        parts += ["### Yes/no tasks: COMPAS (race), adult (sex), crime (race)", "", print_table(out["binary"], cols)]
    if out["bbq"]:
        cols = ["model", "rule", "items", "degenerate", "flip rate %",
                *[f"{k} {w}" for k in ("bias_score_ambig", "bias_score_disambig") for w in ("before", "mean", "majority")],
                "acc before %", "acc mean %", "acc majority %", "s"]
        parts += ["", f"### BBQ (all categories, {args.bbq_limit} items, the two people swapped)", "",
                  print_table(out["bbq"], cols)]
    pairs = out["pairs"]
    if "crows_pairs" in pairs:
        reps, recs = pairs["crows_pairs"], per_item["crows_pairs"]
        rows = [{"model": m, "pairs": r["n_items"], "pct_stereotype % [95%]": ci(r["pct_stereotype"]),
                 **{t: pct(s["value"]) for t, s in r["per_bias_type"].items()}} for m, r in reps.items()]
        names = list(reps)
        if len(names) == 2:
            d = paired_difference([x["stereotype"] for x in recs[names[1]]], [x["stereotype"] for x in recs[names[0]]])
            rows.append({"model": "pruned - dense (paired)", "pairs": d["n"],
                         "pct_stereotype % [95%]": f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                                                   f"{100 * d['ci95'][1]:+.1f}]"})
        cols = ["model", "pairs", "pct_stereotype % [95%]", *next(iter(reps.values()))["per_bias_type"]]
        parts += ["", "### CrowS-Pairs (share of pairs where the more stereotypical sentence is likelier; 50 is "
                  "unbiased; 95% Wilson interval)", "", print_table(rows, cols)]
    if "winobias" in pairs:
        reps, recs = pairs["winobias"], per_item["winobias"]
        rows = []
        for m, r in reps.items():
            row = {"model": m, "sentences": r["n_items"], "decision": r["decision"], "degenerate": r["degenerate"]}
            for t, v in r["per_type"].items():
                row[f"{t} pro %"], row[f"{t} anti %"] = ci(v["pro"]), ci(v["anti"])
                row[f"{t} gap (pts)"] = ci(v["gap"])
            rows.append(row)
        names = list(reps)
        if len(names) == 2:
            row = {"model": "pruned - dense gap (paired)"}
            for t in (1, 2):
                def gaps(m):
                    by = {}
                    for x in recs[m]:
                        if x["type"] == t:
                            by.setdefault(x["pair"], {})[x["stereotype"]] = x["correct"]
                    return {k: v["pro"] - v["anti"] for k, v in by.items() if len(v) == 2}
                g0, g1 = gaps(names[0]), gaps(names[1])
                keys = sorted(set(g0) & set(g1))
                d = paired_difference([g1[k] for k in keys], [g0[k] for k in keys])
                row[f"type{t} gap (pts)"] = (f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                                             f"{100 * d['ci95'][1]:+.1f}]")
            rows.append(row)
        cols = ["model", "sentences", "decision", "degenerate",
                *[f"type{t} {k}" for t in (1, 2) for k in ("pro %", "anti %", "gap (pts)")]]
        parts += ["", "### WinoBias (coreference accuracy, pro- and anti-stereotypical pronoun; gap = pro - anti in "
                  "points, paired 95% interval)", "", print_table(rows, cols)]
    return "\n".join(parts)


def plot(out: dict) -> None:
    """Per-group positive rate before / after (mean) under the default rule, dense and pruned, template on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in out["reports"] if r["template"] and isinstance(r["reports"], dict)
           and DEFAULT_DECISION in r["reports"] and r["dataset"] in ("compas", "adult")]
    if not sel:
        return
    fig, axes = plt.subplots(1, len(sel), figsize=(3.3 * len(sel), 3.6), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], sel):
        rep = r["reports"][DEFAULT_DECISION]["mean"]
        names = list(rep["before"]["per_group"])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [rep["before"]["per_group"][n]["positive_rate"] for n in names], width=0.4,
               label="before")
        ax.bar([i + 0.2 for i in x], [rep["after"]["per_group"][n]["positive_rate"] for n in names], width=0.4,
               label="after (mean)")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{r['dataset']}, {r['model']} ({DEFAULT_DECISION})", fontsize=9)
    axes[0][0].set_ylabel("positive prediction rate")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "fairness.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
