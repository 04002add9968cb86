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
from bias_probe.decision import (DECISIONS, FIT_SHARE, answer_shares, calibrate, calibration_scale, decide,
                                 fit_split, fit_threshold, is_degenerate, mitigate, option_probs, roc_auc)
from bias_probe.errors import BiasProbeError
from bias_probe.metrics import MITIGATIONS, bbq_scores, consistency, group_fairness
from bias_probe.scoring import option_loglikelihoods, use_chat

DEFAULT_MITIGATION = "mean"  # measured: see docs/fairness.md
DEFAULT_DECISION = "calibrated"  # measured: see docs/fairness.md


def load_model(model: str, *, device: str = "auto", dtype: str = "auto", chat_template: str = "auto"):
    """(model, tokenizer) from a local HF directory or a hub id, with one-line errors.

    ``chat_template`` is checked against the tokenizer before the weights are loaded."""
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
        use_chat(tok, chat_template)
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


def default_decision(kind: str) -> str:
    """The rule used when none is asked for: ``DEFAULT_DECISION`` for binary tasks, ``argmax`` otherwise
    (the BBQ bias scores and WinoBias accuracy are defined on the plain answer)."""
    return DEFAULT_DECISION if kind == "binary" else "argmax"


def check_request(data: ProbeData, *, decision: str | None = None, threshold: float | None = None,
                  mitigation: str = DEFAULT_MITIGATION, batch_size: int = 16, min_group_size: int = 10,
                  seed: int = 0) -> str:
    """Refuse an infeasible request before any forward pass; returns the decision rule to use."""
    if mitigation not in MITIGATIONS:
        raise BiasProbeError(f"unknown --mitigation '{mitigation}': choose one of {', '.join(MITIGATIONS)}")
    if batch_size < 1:
        raise BiasProbeError(f"--batch-size must be >= 1 (got {batch_size})")
    rule = decision or default_decision(data.kind)
    if rule not in DECISIONS:
        raise BiasProbeError(f"unknown --decision '{rule}': choose one of {', '.join(DECISIONS)}")
    if threshold is not None and rule != "threshold":
        raise BiasProbeError("--threshold applies to --decision threshold only; add --decision threshold")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BiasProbeError(f"--threshold is a probability between 0 and 1 (got {threshold})")
    if rule == "threshold" and (data.kind != "binary" or any(len(it.options) != 2 for it in data.items)):
        raise BiasProbeError(f"--decision threshold needs a yes/no task; {data.name} is not one: use argmax or "
                             "calibrated")
    if data.kind == "crows" and decision is not None:
        raise BiasProbeError("crows_pairs compares sentence likelihoods and makes no decision; drop --decision")
    if data.kind == "binary":
        fit = set(fit_split(len(data.items), seed)) if rule == "threshold" and threshold is None else set()
        small_groups([it.group for i, it in enumerate(data.items) if i not in fit], min_group_size)
    return rule


def run_probe(model, tokenizer, data: ProbeData, *, mitigation: str = DEFAULT_MITIGATION, decision: str | None = None,
              threshold: float | None = None, chat_template: str = "auto", batch_size: int = 16,
              min_group_size: int = 10, seed: int = 0, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every item under every variant; return (report, per-item records).

    ``decision`` is the rule of ``bias_probe.decision`` (default: :func:`default_decision`). Groups with
    fewer than ``min_group_size`` items are left out of the group-fairness measures (their rates are
    noise) but not out of the flip rate; the report lists them. A fitted threshold's items are scored
    but not reported on (their records carry ``"split": "fit"``).
    """
    rule = check_request(data, decision=decision, threshold=threshold, mitigation=mitigation, batch_size=batch_size,
                         min_group_size=min_group_size, seed=seed)
    chat = use_chat(tokenizer, chat_template)
    t0 = time.perf_counter()
    if data.kind in ("crows", "winobias"):
        from bias_probe.pairs import run_pairs
        report, records = run_pairs(model, tokenizer, data, rule=rule, chat=chat, batch_size=batch_size,
                                    progress=progress)
        report["seconds"] = time.perf_counter() - t0
        return report, records
    pairs, where = [], []
    for i, item in enumerate(data.items):
        for v, text in item.texts.items():
            for o, opt in enumerate(item.options):
                pairs.append((text, opt))
                where.append((i, v, o))
    lls = option_loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress, chat=chat,
                                desc=f"{data.name}: {len(data.items)} items x variants")
    scores: list[dict[str, np.ndarray]] = [{v: np.zeros(len(it.options)) for v in it.texts} for it in data.items]
    for (i, v, o), ll in zip(where, lls):
        scores[i][v][o] = ll
    records = [_record(item, sc) for item, sc in zip(data.items, scores)]
    report = report_from_records(data, records, rule=rule, threshold=threshold, mitigation=mitigation, seed=seed,
                                 min_group_size=min_group_size, chat=chat)
    report["seconds"] = time.perf_counter() - t0
    report["forward_pairs"] = len(pairs)
    return report, records


def report_from_records(data: ProbeData, records: list[dict], *, rule: str, threshold: float | None = None,
                        mitigation: str = DEFAULT_MITIGATION, seed: int = 0, min_group_size: int = 10,
                        chat: bool = False) -> dict:
    """Decide every record under ``rule`` (in place) and measure; the same records can be re-decided
    under another rule without another forward pass."""
    t, source = _decide_all(records, data, rule, threshold, mitigation, seed)
    reported = [r for r in records if r["split"] == "report"]
    report = {"dataset": data.name, "attribute": data.attribute, "values": data.values, "n_items": len(reported),
              "mitigation": mitigation, "decision": rule, "threshold": t, "threshold_source": source,
              "chat_template": chat, **consistency(reported, data.kind)}
    before = [r["pred_before"] for r in reported]
    report["answer_shares"] = {"before": answer_shares(before),
                               "after": answer_shares([r["pred_after"] for r in reported])}
    report["degenerate"] = is_degenerate(before)
    if data.kind == "binary":
        report.update(binary_measures(reported, min_group_size))
        keys = ("statistical_parity_difference", "equal_opportunity_difference", "equalized_odds_difference",
                "positive_probability_gap")
    else:
        meta = [{k: r[k] for k in ("condition", "polarity", "unknown", "target", "category")} for r in reported]
        for when in ("before", "after"):
            report[when] = bbq_scores(meta, [r["label"] for r in reported], [r[f"pred_{when}"] for r in reported])
        keys = ("bias_score_ambig", "bias_score_disambig")
    report["auc"] = report["before"].get("auc")
    report["gain"] = {k: _gain(report["before"][k], report["after"][k]) for k in keys}
    report["accuracy_change"] = _diff(report["after"]["accuracy"], report["before"]["accuracy"])
    return report


def _record(item, sc: dict[str, np.ndarray]) -> dict:
    """One item's option probabilities per variant (normalized over the options, in the original order)."""
    probs = {}
    for v, ll in sc.items():
        p = option_probs(ll)
        perm = item.perms.get(v)
        if perm is not None:  # variant option k is original option perm[k]
            q = np.zeros_like(p)
            q[perm] = p
            p = q
        probs[v] = [float(x) for x in p]
    original = item.group if item.group in probs else next(iter(probs))
    return {"id": item.id, "group": item.group, "label": item.label, "positive": item.positive, "original": original,
            "probs": probs, "split": "report", **item.meta}


def _decide_all(records: list[dict], data: ProbeData, rule: str, threshold: float | None, mitigation: str,
                seed: int) -> tuple[float | None, str | None]:
    """Set ``scores``, ``pred_before``, ``pred_variants``, ``pred_after`` and ``flipped`` on every record."""
    if rule == "calibrated":
        scale = calibration_scale([p for r in records for p in r["probs"].values()])
        for r in records:
            r["scores"] = {v: calibrate(p, scale) for v, p in r["probs"].items()}
    else:
        for r in records:
            r["scores"] = r["probs"]
    t, source = threshold, ("given" if threshold is not None else None)
    for r in records:
        r["split"] = "report"
    if rule == "threshold" and threshold is None:
        fit = fit_split(len(records), seed)
        for i in fit:
            records[i]["split"] = "fit"
        sub = [records[i] for i in fit]
        t = fit_threshold([r["probs"][r["original"]][r["positive"]] for r in sub],
                          [int(r["label"] == r["positive"]) for r in sub])
        source = (f"fitted to the base rate of a seeded {len(fit)}-item split (seed {seed}; {FIT_SHARE:.0%} of the "
                  "items), which is not reported on")
    for r in records:
        pos = r["positive"]
        r["pred_variants"] = {v: decide(p, rule, pos, t) for v, p in r["scores"].items()}
        r["pred_before"] = r["pred_variants"][r["original"]]
        r["pred_after"] = mitigate(list(r["scores"].values()), mitigation, rule, pos, t)
        r["flipped"] = any(p != r["pred_before"] for v, p in r["pred_variants"].items() if v != r["original"])
    return t, source


def small_groups(groups: list[str], min_group_size: int) -> dict[str, int]:
    """Groups below ``min_group_size``; an error unless at least two groups remain."""
    counts = Counter(groups)
    small = {g: n for g, n in counts.items() if n < min_group_size}
    if len(counts) - len(small) < 2:
        raise BiasProbeError(f"fewer than two groups have >= {min_group_size} items ({dict(counts)}); raise --limit "
                             "or lower --min-group-size")
    return small


def binary_measures(records: list[dict], min_group_size: int = 10, preds_after: list[int] | None = None) -> dict:
    """``before`` and ``after`` group fairness over the groups with at least ``min_group_size`` items.

    Besides the rates: the ROC AUC of P(positive) against the label (overall, over the kept groups, and
    per group) and the mean P(positive) per group, with P(positive) the model's probability of the
    positive option (``before``: the original prompt; ``after``: the mean over the variants).
    """
    small = small_groups([r["group"] for r in records], min_group_size)
    keep = [i for i, r in enumerate(records) if r["group"] not in small]
    out = {"groups_excluded": small, "min_group_size": min_group_size}
    after = preds_after or [r["pred_after"] for r in records]
    p_before = [r["probs"][r["original"]][r["positive"]] for r in records]
    p_after = [float(np.mean([p[r["positive"]] for p in r["probs"].values()])) for r in records]
    y = [int(r["label"] == r["positive"]) for r in records]
    for when, preds, probs in (("before", [r["pred_before"] for r in records], p_before),
                               ("after", after, p_after)):
        sub = [records[i] for i in keep]
        ps = [preds[i] for i in keep]
        out[when] = group_fairness([y[i] for i in keep], [int(p == r["positive"]) for p, r in zip(ps, sub)],
                                   [r["group"] for r in sub], [p == r["label"] for p, r in zip(ps, sub)])
        out[when]["accuracy_all_items"] = float(np.mean([p == r["label"] for p, r in zip(preds, records)]))
        out[when]["auc"] = roc_auc([y[i] for i in keep], [probs[i] for i in keep])
        # the decision can be constant for a small model; the mean P(positive) per group still shows a gap
        for g, row in out[when]["per_group"].items():
            idx = [i for i in keep if records[i]["group"] == g]
            row["mean_positive_probability"] = float(np.mean([probs[i] for i in idx]))
            row["auc"] = roc_auc([y[i] for i in idx], [probs[i] for i in idx])
        means = [row["mean_positive_probability"] for row in out[when]["per_group"].values()]
        out[when]["positive_probability_gap"] = max(means) - min(means)
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def _gain(before, after):
    """How much closer to zero the measure got (positive = fairer)."""
    return None if before is None or after is None else abs(before) - abs(after)


def probe(model, dataset: str, attribute: str | None = None, *, tokenizer=None, data_dir: str | None = None,
          limit: int | None = None, seed: int = 0, mitigation: str = DEFAULT_MITIGATION, decision: str | None = None,
          threshold: float | None = None, chat_template: str = "auto", batch_size: int = 16,
          min_group_size: int = 10, device: str = "auto", dtype: str = "auto",
          progress: bool = True) -> tuple[dict, list[dict]]:
    """Run the probe on ``model`` (a loaded HF model with ``tokenizer``, or a directory / hub id).

    Returns (report, per-item records); see ``bias_probe.report`` to write them.
    """
    data = load(dataset, attribute, data_dir=data_dir, limit=limit, seed=seed)
    check_request(data, decision=decision, threshold=threshold, mitigation=mitigation, batch_size=batch_size,
                  min_group_size=min_group_size, seed=seed)  # before the model is loaded
    if isinstance(model, (str, Path)):
        name = str(model)
        model, tokenizer = load_model(name, device=device, dtype=dtype, chat_template=chat_template)
    else:
        if tokenizer is None:
            raise BiasProbeError("pass the tokenizer along with a loaded model")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    report, records = run_probe(model, tokenizer, data, mitigation=mitigation, decision=decision, threshold=threshold,
                                chat_template=chat_template, batch_size=batch_size, min_group_size=min_group_size,
                                seed=seed, progress=progress)
    report = {"model": name, **report, "settings": {"limit": limit, "seed": seed, "batch_size": batch_size,
                                                     "min_group_size": min_group_size,
                                                     "data": data.source, "dtype": str(next(model.parameters()).dtype),
                                                     "device": str(next(model.parameters()).device)},
              "versions": _versions()}
    return report, records
