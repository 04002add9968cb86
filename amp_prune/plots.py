"""PNG of the depth/hybrid search: the score of every block at every step."""

from __future__ import annotations

import math
from pathlib import Path

from amp_prune.plan import PrunePlan
from amp_prune.similarity import rank_sum


def step_scores(step: dict, criterion: str) -> list[float] | None:
    """The per-candidate score plotted for a step: the criterion's metric, or the consensus rank sum."""
    metrics = step.get("metrics") or {}
    if criterion == "consensus" and all(k in metrics for k in ("cka", "angular", "bi", "kl")):
        return rank_sum({k: metrics[k] for k in ("cka", "angular", "bi", "kl")},
                        {"cka": True, "angular": False, "bi": False, "kl": False})
    for key in (criterion, "cka"):
        if key in metrics:
            return metrics[key]
    return None


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
        for orig, v in zip(step["candidates"], values):
            row[orig] = v
        rows.append(row)
        chosen = step.get("removed") or ([step["removed_block"]] if "removed_block" in step else [])
        labels.append(f"{step['step'] + 1}: " + (f"drop {chosen}" if chosen else step.get("choice", "")))
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
