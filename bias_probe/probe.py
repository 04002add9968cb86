"""``probe(...)``: counterfactual forward passes, the fairness measures before and after mitigation.

Testing-time adversaries (Gregio, Pons, Costa, Jordao, 2025): every item is asked once per
value of the protected attribute, with nothing else changed. Disagreeing answers signal bias;
the mitigated decision aggregates the answers over all the variants, so it no longer depends
on the attribute. No training is involved.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from bias_probe.datasets import ProbeData, load
from bias_probe.errors import BiasProbeError
from bias_probe.metrics import MITIGATIONS, aggregate, bbq_scores, consistency, group_fairness
from bias_probe.scoring import option_loglikelihoods

DEFAULT_MITIGATION = "mean"  # measured: see docs/fairness.md


def load_model(model: str, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a local HF directory or a hub id, with one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BiasProbeError(f"device '{device}' requested but no CUDA GPU is visible; use --device cpu")
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise BiasProbeError(f"unknown --dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise BiasProbeError(f"model not found: {model} is neither a local directory nor a hub id (org/name)")
    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dt).to(dev).eval()
    except OSError as e:
        raise BiasProbeError(f"cannot load model '{model}' ({str(e).splitlines()[0][:160]}); pass a local HF "
                             "directory, or a hub id with network access") from None
    return lm, tok


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "fairlearn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_probe(model, tokenizer, data: ProbeData, *, mitigation: str = DEFAULT_MITIGATION, batch_size: int = 16,
              min_group_size: int = 10, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every item under every variant; return (report, per-item records).

    Groups with fewer than ``min_group_size`` items are left out of the group-fairness measures
    (their rates are noise) but not out of the flip rate; the report lists them.
    """
    if mitigation not in MITIGATIONS:
        raise BiasProbeError(f"unknown --mitigation '{mitigation}': choose one of {', '.join(MITIGATIONS)}")
    if batch_size < 1:
        raise BiasProbeError(f"--batch-size must be >= 1 (got {batch_size})")
    if data.kind == "binary":
        small_groups([it.group for it in data.items], min_group_size)  # fail before any forward pass
    t0 = time.perf_counter()
    pairs, where = [], []
    for i, item in enumerate(data.items):
        for v, text in item.texts.items():
            for o, opt in enumerate(item.options):
                pairs.append((text, opt))
                where.append((i, v, o))
    lls = option_loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress,
                                desc=f"{data.name}: {len(data.items)} items x variants")
    scores: list[dict[str, np.ndarray]] = [{v: np.zeros(len(it.options)) for v in it.texts} for it in data.items]
    for (i, v, o), ll in zip(where, lls):
        scores[i][v][o] = ll
    records = []
    for item, sc in zip(data.items, scores):
        probs = {}
        for v, ll in sc.items():
            p = np.exp(ll - ll.max())
            p = p / p.sum()
            perm = item.perms.get(v)
            if perm is not None:  # variant option k is original option perm[k]
                q = np.zeros_like(p)
                q[perm] = p
                p = q
            probs[v] = [float(x) for x in p]
        original = item.group if item.group in probs else next(iter(probs))
        records.append({"id": item.id, "group": item.group, "label": item.label, "positive": item.positive,
                        "original": original, "probs": probs,
                        "pred_before": int(np.argmax(probs[original])),
                        "pred_after": aggregate(list(probs.values()), mitigation), **item.meta})
    for r in records:
        r["flipped"] = any(int(np.argmax(p)) != r["pred_before"] for v, p in r["probs"].items() if v != r["original"])
    report = {"dataset": data.name, "attribute": data.attribute, "values": data.values, "n_items": len(records),
              "mitigation": mitigation, **consistency(records, data.kind)}
    if data.kind == "binary":
        report.update(binary_measures(records, min_group_size))
        keys = ("statistical_parity_difference", "equal_opportunity_difference", "equalized_odds_difference",
                "positive_probability_gap")
    else:
        meta = [{k: r[k] for k in ("condition", "polarity", "unknown", "target", "category")} for r in records]
        for when in ("before", "after"):
            report[when] = bbq_scores(meta, [r["label"] for r in records], [r[f"pred_{when}"] for r in records])
        keys = ("bias_score_ambig", "bias_score_disambig")
    report["gain"] = {k: _gain(report["before"][k], report["after"][k]) for k in keys}
    report["accuracy_change"] = _diff(report["after"]["accuracy"], report["before"]["accuracy"])
    report["seconds"] = time.perf_counter() - t0
    report["forward_pairs"] = len(pairs)
    return report, records


def small_groups(groups: list[str], min_group_size: int) -> dict[str, int]:
    """Groups below ``min_group_size``; an error unless at least two groups remain."""
    counts = Counter(groups)
    small = {g: n for g, n in counts.items() if n < min_group_size}
    if len(counts) - len(small) < 2:
        raise BiasProbeError(f"fewer than two groups have >= {min_group_size} items ({dict(counts)}); raise --limit "
                             "or lower --min-group-size")
    return small


def binary_measures(records: list[dict], min_group_size: int = 10, preds_after: list[int] | None = None) -> dict:
    """``before`` and ``after`` group fairness over the groups with at least ``min_group_size`` items."""
    small = small_groups([r["group"] for r in records], min_group_size)
    keep = [i for i, r in enumerate(records) if r["group"] not in small]
    out = {"groups_excluded": small, "min_group_size": min_group_size}
    after = preds_after or [r["pred_after"] for r in records]
    p_before = [r["probs"][r["original"]][r["positive"]] for r in records]
    p_after = [float(np.mean([p[r["positive"]] for p in r["probs"].values()])) for r in records]
    for when, preds, probs in (("before", [r["pred_before"] for r in records], p_before),
                               ("after", after, p_after)):
        sub = [records[i] for i in keep]
        ps = [preds[i] for i in keep]
        out[when] = group_fairness([int(r["label"] == r["positive"]) for r in sub],
                                   [int(p == r["positive"]) for p, r in zip(ps, sub)], [r["group"] for r in sub],
                                   [p == r["label"] for p, r in zip(ps, sub)])
        out[when]["accuracy_all_items"] = float(np.mean([p == r["label"] for p, r in zip(preds, records)]))
        # the argmax can be constant for a small model; the mean P(positive) per group still shows a gap
        for g, row in out[when]["per_group"].items():
            row["mean_positive_probability"] = float(np.mean([probs[i] for i in keep if records[i]["group"] == g]))
        means = [row["mean_positive_probability"] for row in out[when]["per_group"].values()]
        out[when]["positive_probability_gap"] = max(means) - min(means)
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def _gain(before, after):
    """How much closer to zero the measure got (positive = fairer)."""
    return None if before is None or after is None else abs(before) - abs(after)


def probe(model, dataset: str, attribute: str | None = None, *, tokenizer=None, data_dir: str | None = None,
          limit: int | None = None, seed: int = 0, mitigation: str = DEFAULT_MITIGATION, batch_size: int = 16,
          min_group_size: int = 10, device: str = "auto", dtype: str = "auto",
          progress: bool = True) -> tuple[dict, list[dict]]:
    """Run the probe on ``model`` (a loaded HF model with ``tokenizer``, or a directory / hub id).

    Returns (report, per-item records); see ``bias_probe.report`` to write them.
    """
    data = load(dataset, attribute, data_dir=data_dir, limit=limit, seed=seed)
    if isinstance(model, (str, Path)):
        name = str(model)
        model, tokenizer = load_model(name, device=device, dtype=dtype)
    else:
        if tokenizer is None:
            raise BiasProbeError("pass the tokenizer along with a loaded model")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    report, records = run_probe(model, tokenizer, data, mitigation=mitigation, batch_size=batch_size,
                                min_group_size=min_group_size, progress=progress)
    report = {"model": name, **report, "settings": {"limit": limit, "seed": seed, "batch_size": batch_size,
                                                     "min_group_size": min_group_size,
                                                     "data": data.source, "dtype": str(next(model.parameters()).dtype),
                                                     "device": str(next(model.parameters()).device)},
              "versions": _versions()}
    return report, records
