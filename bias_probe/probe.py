"""``probe(...)``: counterfactual forward passes, the fairness measures before and after mitigation.

Testing-time adversaries (Gregio, Pons, Costa, Jordao, 2025): every item is asked once per
value of the protected attribute, with nothing else changed. Disagreeing answers signal bias;
the mitigated decision aggregates the answers over all the variants, so it no longer depends
on the attribute. No training is involved.
"""

from __future__ import annotations

import platform
import time
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
              progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every item under every variant; return (report, per-item records)."""
    if mitigation not in MITIGATIONS:
        raise BiasProbeError(f"unknown --mitigation '{mitigation}': choose one of {', '.join(MITIGATIONS)}")
    if batch_size < 1:
        raise BiasProbeError(f"--batch-size must be >= 1 (got {batch_size})")
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
        for when in ("before", "after"):
            preds = [r[f"pred_{when}"] for r in records]
            report[when] = group_fairness([int(r["label"] == r["positive"]) for r in records],
                                          [int(p == r["positive"]) for p, r in zip(preds, records)],
                                          [r["group"] for r in records],
                                          [p == r["label"] for p, r in zip(preds, records)])
        keys = ("statistical_parity_difference", "equal_opportunity_difference", "equalized_odds_difference")
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


def _diff(a, b):
    return None if a is None or b is None else a - b


def _gain(before, after):
    """How much closer to zero the measure got (positive = fairer)."""
    return None if before is None or after is None else abs(before) - abs(after)


def probe(model, dataset: str, attribute: str | None = None, *, tokenizer=None, data_dir: str | None = None,
          limit: int | None = None, seed: int = 0, mitigation: str = DEFAULT_MITIGATION, batch_size: int = 16,
          device: str = "auto", dtype: str = "auto", progress: bool = True) -> tuple[dict, list[dict]]:
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
                                progress=progress)
    report = {"model": name, **report, "settings": {"limit": limit, "seed": seed, "batch_size": batch_size,
                                                     "data": data.source, "dtype": str(next(model.parameters()).dtype),
                                                     "device": str(next(model.parameters()).device)},
              "versions": _versions()}
    return report, records
