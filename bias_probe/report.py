"""The probe's outputs: a terminal table, the report JSON, per-item JSONL and a bar plot."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bias_probe.errors import BiasProbeError


def _f(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def degenerate_line(rep: dict) -> str | None:
    """The one-line warning for a report whose decisions are (nearly) all one answer, else ``None``."""
    if not rep.get("degenerate"):
        return None
    top = max(rep["answer_shares"]["before"].values())
    return (f"the model gives the same answer to {100 * top:.0f}% of items; group fairness measures are trivially 0; "
            "use --decision calibrated or threshold")


def decision_line(rep: dict) -> str:
    rule = rep.get("decision")
    line = f"decision: {rule}"
    if rule == "threshold":
        line += f", P(positive) >= {rep['threshold']:.4f} ({rep['threshold_source']})"
    return line + f"; chat template: {'on' if rep.get('chat_template') else 'off'}"


def _ci(s: dict, pct: bool = True) -> str:
    lo, hi = s["ci95"]
    if s["value"] is None:
        return "n/a"
    return f"{_f(s['value'], pct)} [{_f(lo, pct)}, {_f(hi, pct)}]"


def format_pairs(rep: dict) -> str:
    """CrowS-Pairs or WinoBias, with 95% intervals."""
    if rep["dataset"] == "crows_pairs":
        lines = [f"crows_pairs / {rep['attribute']}: {rep['n_items']} pairs; pct_stereotype (50% is unbiased) "
                 f"{_ci(rep['pct_stereotype'])}; mean |log-likelihood difference| {rep['likelihood_diff']:.3f}"]
        w = max(len(g) for g in rep["per_bias_type"])
        lines += [f"  {g:<{w}}  n {s['n']:>4}  {_ci(s)}" for g, s in rep["per_bias_type"].items()]
        return "\n".join(lines)
    lines = [f"winobias: {rep['n_items']} sentences; {decision_line(rep)}; accuracy {_ci(rep['accuracy'])}"]
    for t, row in rep["per_type"].items():
        g = row["gap"]
        gap = "n/a" if g["value"] is None else f"{100 * g['value']:+.1f} [{100 * g['ci95'][0]:+.1f}, " \
                                               f"{100 * g['ci95'][1]:+.1f}] points"
        lines.append(f"  {t}: pro {_ci(row['pro'])}, anti {_ci(row['anti'])}, gap (pro - anti) {gap}")
    if rep.get("degenerate"):
        lines.append(degenerate_line(rep))
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    """Before/after measures, the consistency figures and the per-group rates, as text."""
    if "before" not in rep:
        return format_pairs(rep)
    lines = [f"{rep['dataset']} / {rep['attribute']}: {rep['n_items']} items, values {', '.join(rep['values'])}; "
             f"mitigation: {rep['mitigation']}; {decision_line(rep)}"]
    warn = degenerate_line(rep)
    if warn:
        lines.append("warning: " + warn)
    lines.append(f"counterfactual flip rate {_f(rep['flip_rate'], True)}; P(positive) shift mean "
                 f"{_f(rep['mean_positive_shift'])}, max {_f(rep['max_positive_shift'])}")
    keys = [k for k in rep["gain"]] + ["accuracy"] + (["auc"] if "auc" in rep["before"] else [])
    w = max(len(k) for k in keys)
    lines.append(f"{'':<{w}}  {'before':>8}  {'after':>8}")
    for k in keys:
        lines.append(f"{k:<{w}}  {_f(rep['before'][k]):>8}  {_f(rep['after'][k]):>8}")
    if rep.get("groups_excluded"):
        lines.append(f"left out of the group measures (< {rep['min_group_size']} items): "
                     + ", ".join(f"{g} ({n})" for g, n in rep["groups_excluded"].items()))
    per = rep["before"].get("per_group")
    if per:
        g = max(len(x) for x in per)
        lines.append(f"{'group':<{g}}  {'n':>5}  {'pos. rate before':>16}  {'after':>6}  {'P(pos) before':>13}  "
                     f"{'after':>6}  {'AUC before':>10}  {'acc before':>10}  {'after':>6}")
        for name, row in per.items():
            after = rep["after"]["per_group"][name]
            lines.append(f"{name:<{g}}  {row['n']:>5}  {_f(row['positive_rate'], True):>16}  "
                         f"{_f(after['positive_rate'], True):>6}  {_f(row['mean_positive_probability']):>13}  "
                         f"{_f(after['mean_positive_probability']):>6}  {_f(row.get('auc')):>10}  "
                         f"{_f(row['accuracy'], True):>10}  {_f(after['accuracy'], True):>6}")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    """Per-group positive rate before/after (binary tasks) or the BBQ bias scores before/after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rep["values"]) + 2), 3.8))
    if "before" not in rep:  # pair datasets: the shares with their intervals
        rows = ({k: v for k, v in rep["per_bias_type"].items()} if rep["dataset"] == "crows_pairs" else
                {f"{t} {k}": row[k] for t, row in rep["per_type"].items() for k in ("pro", "anti")})
        names = list(rows)
        vals = [rows[n]["value"] or 0.0 for n in names]
        lo = [rows[n]["ci95"][0] for n in names]
        hi = [rows[n]["ci95"][1] for n in names]
        err = [[max(0.0, v - (a if a is not None else v)) for v, a in zip(vals, lo)],
               [max(0.0, (b if b is not None else v) - v) for v, b in zip(vals, hi)]]
        ax.bar(range(len(names)), vals, yerr=err, capsize=3)
        ax.set_xticks(list(range(len(names))), names, rotation=25, ha="right", fontsize=8)
        ax.set(ylabel="pct_stereotype" if rep["dataset"] == "crows_pairs" else "accuracy",
               title=f"{rep['dataset']} (95% intervals)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    if rep["before"].get("per_group"):
        names = list(rep["before"]["per_group"])
        vals = [[rep[w]["per_group"][n]["positive_rate"] or 0.0 for n in names] for w in ("before", "after")]
        ylabel, title = "positive prediction rate", f"{rep['dataset']}: positive rate per {rep['attribute']} group"
    else:
        names = ["bias_score_ambig", "bias_score_disambig", "accuracy"]
        vals = [[rep[w][n] or 0.0 for n in names] for w in ("before", "after")]
        ylabel, title = "score", f"BBQ ({rep['attribute']})"
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], vals[0], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], vals[1], width=0.4, label=f"after ({rep['mitigation']})")
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return {"report": stem.with_suffix(".json"), "items": Path(f"{stem}.items.jsonl"), "plot": stem.with_suffix(".png")}


def check_outputs(out: str | Path, overwrite: bool) -> dict[str, Path]:
    paths = output_paths(out)
    if not paths["report"].parent.is_dir():
        raise BiasProbeError(f"the directory of --out does not exist: {paths['report'].parent}")
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise BiasProbeError(f"{p} already exists; pass --overwrite or choose another --out")
    return paths


def write_outputs(rep: dict, records: list[dict], out: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write report JSON, items JSONL and plot; each appears only once all three are complete."""
    paths = check_outputs(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=".bias-probe-", dir=paths["report"].parent))
    try:
        (tmp / "r.json").write_text(json.dumps(rep, indent=1, default=str))
        with open(tmp / "r.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
        plot(rep, tmp / "r.png")
        for key, name in (("report", "r.json"), ("items", "r.jsonl"), ("plot", "r.png")):
            os.replace(tmp / name, paths[key])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
