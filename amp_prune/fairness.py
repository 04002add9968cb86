"""Dense-vs-pruned tables for ``--bias-check`` (the probe itself lives in the ``bias_probe`` package)."""

from __future__ import annotations


def _rows(bias: dict) -> list[tuple[str, str, str, str]]:
    d, p = bias["dense"], bias["pruned"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    def delta(a, b):
        return "n/a" if a is None or b is None else f"{b - a:+.3f}"
    rows = [("counterfactual flip rate", f(d["flip_rate"]), f(p["flip_rate"]), delta(d["flip_rate"], p["flip_rate"]))]
    for k in [*d["gain"], "accuracy"]:
        a, b = d["before"][k], p["before"][k]
        rows.append((k, f(a), f(b), delta(a, b)))
    for k in [*d["gain"], "accuracy"]:
        a, b = d["after"][k], p["after"][k]
        rows.append((f"{k} (mitigated: {d['mitigation']})", f(a), f(b), delta(a, b)))
    return rows


def format_bias_comparison(bias: dict) -> str:
    d = bias["dense"]
    rows = _rows(bias)
    w = max(len(r[0]) for r in rows)
    lines = [f"fairness check: {d['dataset']} / {d['attribute']}, {d['n_items']} items (closer to 0 is fairer)",
             f"{'':<{w}}  {'dense':>8}  {'pruned':>8}  {'delta':>8}"]
    lines += [f"{a:<{w}}  {b:>8}  {c:>8}  {e:>8}" for a, b, c, e in rows]
    return "\n".join(lines)


def markdown_bias_comparison(bias: dict) -> str:
    d = bias["dense"]
    lines = ["| | dense | pruned | delta |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in _rows(bias)]
    lines += ["", f"bias_probe on {d['dataset']} (attribute {d['attribute']}, {d['n_items']} items, values "
              f"{', '.join(d['values'])}): counterfactual forward passes with only the attribute changed. "
              "Differences are the largest gap between groups; closer to 0 is fairer."]
    return "\n".join(lines)
