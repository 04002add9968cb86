"""Decision rules: how the option probabilities of one prompt become an answer.

A small model's argmax can give the same answer to every item ("fair by silence"): its group
rates are then trivially equal. The rules here keep the information in the probabilities:

- ``argmax``: the option with the highest probability.
- ``calibrated``: batch calibration (Zhou et al. 2023, 2309.17249). With ``p_o(x)`` the
  probability of option ``o`` for prompt ``x`` and ``m_o`` its mean over every probed item and
  every variant, ``p'_o(x) = (p_o(x) / m_o) / sum_k (p_k(x) / m_k)``; the answer is the argmax of
  ``p'``. It removes the model's prior for one option and uses no labels.
- ``threshold`` (binary tasks): positive when ``P(positive) >= t``. ``t`` is given, or fitted on
  a seeded held-out share of the items (``FIT_SHARE``) so that the positive rate there equals
  their base rate; those items are then not reported on.

``degenerate``: more than ``DEGENERATE_SHARE`` of the decisions are one answer; group fairness
measures are then trivially 0 and say nothing.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np

from bias_probe.errors import BiasProbeError

DECISIONS = ("argmax", "calibrated", "threshold")
FIT_SHARE = 0.3  # share of the items a threshold is fitted on (then left out of the report)
DEGENERATE_SHARE = 0.98


def option_probs(loglik) -> np.ndarray:
    """The options' probabilities from their log-likelihoods: ``softmax`` over the options; (n_options,)."""
    ll = np.asarray(loglik, dtype=float)
    p = np.exp(ll - ll.max())
    return p / p.sum()


def calibration_scale(probs: list[list[float]]) -> np.ndarray:
    """``m_o``: the mean probability of each option over all given prompts; (n_prompts, n_options) -> (n_options,)."""
    m = np.asarray(probs, dtype=float).mean(axis=0)
    return np.maximum(m, 1e-12)


def calibrate(p: list[float], scale: np.ndarray) -> list[float]:
    """``p'_o = (p_o / m_o) / sum_k (p_k / m_k)``."""
    q = np.asarray(p, dtype=float) / scale
    return [float(x) for x in q / q.sum()]


def fit_split(n_items: int, seed: int) -> list[int]:
    """Indices (sorted) of the ``FIT_SHARE`` of the items a threshold is fitted on; seeded, label-free."""
    k = max(1, round(FIT_SHARE * n_items))
    if n_items - k < 2:
        raise BiasProbeError(f"--decision threshold needs items to fit on and to report on; {n_items} items are too "
                             "few (raise --limit, or give --threshold)")
    return sorted(random.Random(seed + 7919).sample(range(n_items), k))


def fit_threshold(p_positive: list[float], y_positive: list[int]) -> float:
    """``t`` with ``mean(p >= t) = mean(y)`` as closely as the scores allow (midpoint between neighbours).

    With the scores sorted high to low as ``s_1 >= s_2 >= ...`` and ``k = round(base rate * n)``:
    ``t = (s_k + s_{k+1}) / 2``; ``k = 0`` gives a ``t`` above every score, ``k = n`` the lowest score.
    """
    s = sorted((float(x) for x in p_positive), reverse=True)
    n = len(s)
    if n == 0:
        raise BiasProbeError("no items to fit the threshold on")
    k = round(float(np.mean(y_positive)) * n)
    if k <= 0:
        return math.nextafter(s[0], math.inf)
    if k >= n:
        return s[-1]
    return (s[k - 1] + s[k]) / 2


def decide(p: list[float], rule: str, positive: int | None = None, threshold: float | None = None) -> int:
    """The answer (option index) for the option probabilities ``p`` (already calibrated for ``calibrated``)."""
    if rule == "threshold":
        if positive is None or len(p) != 2 or threshold is None:
            raise ValueError("the threshold rule needs a binary item and a threshold")
        return positive if p[positive] >= threshold else 1 - positive
    return int(np.argmax(p))


def mitigate(probs: list[list[float]], method: str, rule: str, positive: int | None = None,
             threshold: float | None = None) -> int:
    """The decision over the original and all its variants: ``mean`` decides on the mean probabilities;
    ``majority`` takes the most frequent per-variant decision, ties going to the decision on the mean."""
    mean = [float(x) for x in np.mean(np.asarray(probs, dtype=float), axis=0)]
    on_mean = decide(mean, rule, positive, threshold)
    if method == "mean":
        return on_mean
    if method == "majority":
        votes = Counter(decide(p, rule, positive, threshold) for p in probs)
        top = max(votes.values())
        tied = [o for o, v in votes.items() if v == top]
        if len(tied) == 1:
            return tied[0]
        return on_mean if on_mean in tied else max(tied, key=lambda o: mean[o])
    raise ValueError(f"unknown mitigation '{method}': choose mean or majority")


def answer_shares(preds: list[int]) -> dict[int, float]:
    """The share of the decisions that are each answer."""
    n = len(preds)
    return {int(k): v / n for k, v in sorted(Counter(preds).items())} if n else {}


def is_degenerate(preds: list[int]) -> bool:
    """True when more than ``DEGENERATE_SHARE`` of the decisions share one answer (for two options: the
    positive rate is above 98% or below 2%)."""
    return bool(preds) and max(answer_shares(preds).values()) > DEGENERATE_SHARE


def roc_auc(y_true: list[int], score: list[float]) -> float | None:
    """ROC AUC of ``score`` against binary ``y_true`` (scikit-learn); ``None`` when one class is absent."""
    from sklearn.metrics import roc_auc_score

    if len(set(int(y) for y in y_true)) < 2:
        return None
    return float(roc_auc_score(np.asarray(y_true, dtype=int), np.asarray(score, dtype=float)))
