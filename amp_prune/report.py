"""Every table, summary and plot renderer: the CLI, the model card and the docs use these same functions.

Renderers read plain dicts (the run summary, lm-eval results, bias_probe reports) and typed plan
steps; they never compute a measurement.
"""

from __future__ import annotations

import math
from pathlib import Path

from amp_prune.plan import DepthStep, HybridStep, PrunePlan, Step

Row = tuple[str, ...]


# ---- generic tables -------------------------------------------------------------------
def text_table(header: Row, rows: list[Row], widths: int = 8) -> str:
    """Fixed-width text: the first column left-aligned, the others right-aligned."""
    w = max([len(r[0]) for r in rows] + [len(header[0]), 4])
    cols = [max(widths, *(len(r[i]) for r in [header, *rows])) for i in range(1, len(header))]
    fmt = lambda r: "  ".join([f"{r[0]:<{w}}", *(f"{c:>{n}}" for c, n in zip(r[1:], cols))])  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def markdown_table(header: Row, rows: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ppl(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def _pct(x: float | None, scale: float = 100.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.2f}"


# ---- the pruning run ----------------------------------------------------------------------
def summary_rows(s: dict) -> list[Row]:
    """(measure, before, after) rows of a run summary."""
    return [
        ("parameters", f"{s['params_before']:,}", f"{s['params_after']:,}"),
        ("heads / KV heads per block", f"{s['heads_before']} / {s['kv_before']}", f"{s['heads_after']} / {s['kv_after']}"),
        ("decoder blocks", str(s["layers_before"]), str(s["layers_after"])),
        ("MLP channels per block", str(s["channels_before"]), str(s["channels_after"])),
        ("held-out perplexity", _ppl(s["ppl_before"]), _ppl(s["ppl_after"])),
    ]


def format_summary(s: dict, timings: dict, out: str | None) -> str:
    """The final human-readable summary of a pruning run."""
    lines = [text_table(("", "before", "after"), summary_rows(s), widths=14)]
    lines += [f"note: {n}" for n in s.get("notes", [])]
    if s.get("split"):
        lines.append(format_split(s["split"]))
    if s.get("standin"):
        lines.append(format_standin(s["standin"]))
    target = f"target {s['target_ratio']:.0%}" if s.get("target_ratio") is not None else s["method"]
    removed = f"{s['achieved_ratio']:.2%} of all parameters ({target})"
    if s.get("ratio_of") == "blocks":
        removed = f"{s['achieved_block_ratio']:.2%} of the decoder blocks' parameters ({target}), " \
                  f"{s['achieved_ratio']:.2%} of all"
    elif s.get("achieved_block_ratio", 0) >= 1.5 * s["achieved_ratio"] > 0:  # embedding-heavy: say where the cut fell
        removed += f", which is {s['achieved_block_ratio']:.0%} of the decoder blocks' (--ratio-of blocks sets that share)"
    lines.append(f"removed {removed}; "
                 f"wall time {timings.get('total_s', 0):.1f}s, peak RSS {timings.get('peak_rss_mb', 0):.0f} MiB")
    if out:
        lines.append(f"saved to {out} ({s.get('exported_class')}); reloaded with from_pretrained, "
                     f"logits match (max |diff| {s.get('export_max_abs_diff', 0):.1e})")
        if s.get("gguf"):
            lines.append(f"llama.cpp / Ollama: {out}/{s['gguf']}")
    return "\n".join(lines)


def format_split(split: list[dict]) -> str:
    """The attention/MLP splits considered: units removed per block, channels, calibration loss (lower is better)."""
    cells = [f"{c['attn_units']} attention units + {c['channels']} channels: loss {c['calib_loss']:.3f}"
             + (" (chosen)" if c["chosen"] else "") for c in split]
    return "split (removed per block): " + "; ".join(cells)


def format_standin(fits: list[dict]) -> str:
    """Each dropped span's stand-in: its form, the damping used (or none) and the held-out share left unexplained."""
    cells = []
    for f in fits:
        a, b = f["span"]
        span = (f"block {a}" if a == b else f"blocks {a}-{b}") + (f" ({f['form']})" if f.get("form") else "")
        sc = f.get("heldout_unexplained") or {}
        if f.get("kept") is False:
            kl = f["calib_kl"]
            cells.append(f"{span}: left out (KL to the dense model on calibration text {kl['with']:.3f} with it, "
                         f"{kl['without']:.3f} without)")
        elif f["damp"] is None:
            cells.append(f"{span}: none (plain dropping leaves {sc['identity']:.3f} unexplained; no fit did better)")
        elif sc:
            cells.append(f"{span}: damp {f['damp']:g}, held-out unexplained {sc[str(f['damp'])]:.3f} "
                         f"(plain dropping {sc['identity']:.3f})")
        else:
            cells.append(f"{span}: damp {f['damp']:g}")
        if f.get("kept"):
            kl = f["calib_kl"]
            cells[-1] += f", KL to the dense model {kl['with']:.3f} (plain dropping {kl['without']:.3f})"
    return "stand-in: " + "; ".join(cells)


def step_scores(step: Step, criterion: str) -> list[float] | None:
    """The per-candidate score shown for a step: the criterion's metric, or the consensus rank sum."""
    from amp_prune.depth.search import CONSENSUS, HIGHER_IS_REMOVABLE
    from amp_prune.depth.similarity import rank_sum

    metrics = step.metrics or {}
    if criterion == "consensus" and all(k in metrics for k in CONSENSUS):
        return rank_sum({k: metrics[k] for k in CONSENSUS}, HIGHER_IS_REMOVABLE)
    for key in (criterion, "cka"):
        if key in metrics:
            return metrics[key]
    return None


def format_steps(steps: list[Step], top: int = 5) -> str:
    """One line per depth/hybrid step: the choice and the best candidates with their scores."""
    lines = []
    for st in steps:
        head = f"step {st.step + 1:>2}: "
        if isinstance(st, HybridStep):
            if st.final:
                lines.append(head + f"final width step, {st.removed_params:,} parameters")
            else:
                lines.append(head + f"{st.choice:<5}  CKA to parent: depth (block {st.depth_block}) "
                             f"{st.cka_depth:.4f} vs width {st.cka_width:.4f}")
            continue
        name = st.score_name if st.score_name in st.metrics else "rank sum"
        vals = step_scores(st, st.score_name)
        higher = name == "cka"
        order = sorted(range(len(vals)), key=lambda i: -vals[i] if higher else vals[i])[:top]
        cands = ", ".join(f"{st.candidates[i]}:{vals[i]:.4f}" for i in order)
        fresh = f"  (rescored {len(st.rescored)} of {len(st.candidates)})" if st.rescored is not None else ""
        lines.append(head + f"drop {st.removed}  best {name} (block:score) {cands}{fresh}")
    return "\n".join(lines)


def plot_steps(plan: PrunePlan, path: str | Path) -> None:
    """Heatmap: rows = steps, columns = original block index, colour = the block's score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = plan.dims["n_layers"]
    crit = "cka" if plan.method == "hybrid" else plan.criterion
    rows, labels = [], []
    for step in plan.steps:
        values = step_scores(step, crit)
        if values is None:
            continue
        row = [math.nan] * n_layers
        for orig, v in zip(step.candidates, values):
            row[orig] = v
        rows.append(row)
        if isinstance(step, DepthStep):
            labels.append(f"{step.step + 1}: drop {step.removed}")
        else:
            labels.append(f"{step.step + 1}: " + (f"drop {[step.removed_block]}" if step.choice == "depth" else step.choice))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, n_layers * 0.3), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("block (original index)")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 15)))
    score = "rank sum (lower = more removable)" if crit == "consensus" else crit
    ax.set_title(f"--method {plan.method}: {score} of each candidate block, per step (white = already removed)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_finetune(s: dict) -> str:
    kl = (f", KL to the teacher {s['kl_before']:.3f} -> {s['kl_after']:.3f}" if s.get("kl_before") is not None
          else "")
    return (f"{s.get('mode', 'LoRA recovery')}: {s['steps']} steps ({s.get('loss', 'lm')} loss) on "
            f"{s['train_examples']} {s['data_kind']} examples"
            + (f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else "")
            + f"; held-out perplexity {s['ppl_before']:.2f} -> {s['ppl_after']:.2f}{kl}; {s['total_s']:.0f}s\n"
            f"saved to {s['out']}; reloaded with from_pretrained, logits match (max |diff| "
            f"{s['export_max_abs_diff']:.1e})")


# ---- evaluation -----------------------------------------------------------------------------
def format_results(res: dict) -> str:
    """Per-task acc and acc_norm (percent), the 5-task average and the perplexity, as a text table."""
    lines = []
    if res["tasks"]:
        rows = [(name, str(row["n"]), _pct(row.get("acc")), _pct(row.get("acc_norm")))
                for name, row in res["tasks"].items()]
        if res.get("avg5") is not None:
            rows.append(("5-task average", "", _pct(res["avg5_acc"]), _pct(res["avg5"])))
        lines.append(text_table(("task", "n", "acc", "acc_norm"), rows, widths=6))
        if res.get("avg5") is not None:
            lines.append("(5-task average, acc_norm column: acc_norm where defined, WinoGrande acc)")
        else:
            lines.append("5-task average: needs piqa, hellaswag, winogrande, arc_easy and arc_challenge")
    if "wikitext2" in res:
        p = res["wikitext2"]
        lines.append(f"WikiText-2 perplexity {p['ppl']:.2f} ({p['windows']} x {p['seq_len']} tokens)")
    if res["settings"].get("limit"):
        lines.append(f"limit: first {res['settings']['limit']} examples per task (not the full sets)")
    return "\n".join(lines)


def side_by_side_rows(dense: dict, pruned: dict) -> list[Row]:
    """(measure, dense, pruned, delta) rows; accuracy in percent, deltas in points."""
    rows = []
    for name in dense["tasks"]:
        d, p = dense["tasks"][name], pruned["tasks"].get(name, {})
        key = "acc_norm" if "acc_norm" in d else "acc"
        a, b = d.get(key), p.get(key)
        rows.append((f"{name} {key}", _pct(a), _pct(b), "-" if a is None or b is None else f"{(b - a) * 100:+.2f}"))
    if dense.get("avg5") is not None and pruned.get("avg5") is not None:
        rows.append(("5-task average", _pct(dense["avg5"]), _pct(pruned["avg5"]),
                     f"{(pruned['avg5'] - dense['avg5']) * 100:+.2f}"))
    if "wikitext2" in dense and "wikitext2" in pruned:
        a, b = dense["wikitext2"]["ppl"], pruned["wikitext2"]["ppl"]
        rows.append(("wikitext2 perplexity", f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"))
    return rows


def format_side_by_side(dense: dict, pruned: dict) -> str:
    """Dense and pruned results next to each other, with deltas (accuracy in points)."""
    return text_table(("", "dense", "pruned", "delta"), side_by_side_rows(dense, pruned))


def markdown_side_by_side(dense: dict, pruned: dict) -> str:
    """The side-by-side comparison as a Markdown table, with its settings underneath."""
    st = dense["settings"]
    return "\n".join([markdown_table(("", "dense", "pruned", "delta"), side_by_side_rows(dense, pruned)), "",
                      f"Zero-shot lm-eval {st['lm_eval']}, accuracy in percent ({st['data']}"
                      + (f", first {st['limit']} examples per task" if st.get("limit") else "") + ")."
                      + (f" Perplexity: {dense['wikitext2']['protocol']}." if "wikitext2" in dense else "")])


# ---- fairness (--bias-check) -----------------------------------------------------------------
def _bias_rows(bias: dict) -> list[Row]:
    """Rows of the dense / pruned fairness comparison (binary and BBQ reports, CrowS-Pairs or WinoBias)."""
    d, p = bias["dense"], bias["pruned"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    def delta(a, b):
        return "n/a" if a is None or b is None else f"{b - a:+.3f}"

    def ci(s):
        return "n/a" if s["value"] is None else f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    if d["dataset"] == "crows_pairs":
        return [("pct_stereotype (0.5 is unbiased)", ci(d["pct_stereotype"]), ci(p["pct_stereotype"]),
                 delta(d["pct_stereotype"]["value"], p["pct_stereotype"]["value"]))]
    if d["dataset"] == "winobias":
        rows = []
        for t in d["per_type"]:
            for k in ("pro", "anti", "gap"):
                rows.append((f"{t} {k if k == 'gap' else k + ' accuracy'}", ci(d["per_type"][t][k]),
                             ci(p["per_type"][t][k]), delta(d["per_type"][t][k]["value"], p["per_type"][t][k]["value"])))
        return rows
    rows = [("decision rule", d["decision"], p["decision"], ""),
            ("degenerate (one answer for > 98% of items)", str(d["degenerate"]).lower(), str(p["degenerate"]).lower(), ""),
            ("counterfactual flip rate", f(d["flip_rate"]), f(p["flip_rate"]), delta(d["flip_rate"], p["flip_rate"]))]
    for block, suffix in (("before", ""), ("after", f" (mitigated: {d['mitigation']})")):
        for k in [*d["gain"], "accuracy", *(["auc"] if "auc" in d[block] else [])]:
            a, b = d[block][k], p[block][k]
            rows.append((k + suffix, f(a), f(b), delta(a, b)))
    return rows


def _degenerate_note(bias: dict) -> list[str]:
    from bias_probe.report import degenerate_line
    return [f"{who}: {degenerate_line(bias[who])}" for who in ("dense", "pruned") if bias[who].get("degenerate")]


def format_bias_comparison(bias: dict) -> str:
    d = bias["dense"]
    how = {"crows_pairs": "95% intervals", "winobias": "95% intervals; a gap near 0 is fairer"}.get(d["dataset"],
                                                                                           "closer to 0 is fairer")
    return "\n".join([f"fairness check: {d['dataset']} / {d['attribute']}, {d['n_items']} items ({how})",
                      text_table(("", "dense", "pruned", "delta"), _bias_rows(bias)), *_degenerate_note(bias)])


def markdown_bias_comparison(bias: dict) -> str:
    d = bias["dense"]
    return "\n".join([markdown_table(("", "dense", "pruned", "delta"), _bias_rows(bias)), "",
                      *[x for line in _degenerate_note(bias) for x in (f"**Note:** {line}", "")],
                      f"bias_probe on {d['dataset']} (attribute {d['attribute']}, {d['n_items']} items, values "
                      f"{', '.join(d['values'])}): counterfactual forward passes with only the attribute changed. "
                      + ("Intervals are 95% (Wilson; paired for the WinoBias gap)." if "before" not in d else
                         "Differences are the largest gap between groups; closer to 0 is fairer.")])
