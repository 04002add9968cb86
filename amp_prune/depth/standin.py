"""A linear stand-in for each span of dropped blocks, folded into the last kept block's ``down_proj``.

For a maximal span of dropped blocks ``a..b`` (``a >= 1``), block ``a-1`` is the last kept one.
Its output is ``h = y + m``: ``y`` the residual after its attention, ``m = W_down z`` its MLP
output. On the dense model's calibration tokens, with ``d = h_{b+1} - y`` (what the residual
stream needs from block ``a-1``'s MLP for the span to be skipped), fit ``T`` ``[H, H]`` by ridge
least squares toward the identity (rows are tokens, ``M`` ``[N, H]``, ``D`` ``[N, H]``):

    min_T || M T - D ||^2 + lam || T - I ||^2   =>   T = (M^T M + lam I)^-1 (M^T D + lam I)

with ``lam = damp * mean(diag M^T M)``, and ``M^T D = M^T h_{b+1} - M^T y``. Then ``m T = (W_down z)^T T``, i.e. in torch's
``[out, in]`` layout ``W_down <- T^T W_down`` (and a ``down_proj`` bias ``b <- T^T b``): the config
stays a stock Llama. This is ReplaceMe (arXiv 2505.02819); a drop of nothing gives ``T = I``.
A span that starts at block 0 has no block to fold into and gets no stand-in.

``damp="auto"`` chooses the damping per span by K-fold cross-validation over the calibration
batches (batch ``j`` in fold ``j mod K``): for each ``damp`` in :data:`DAMP_GRID`, ``T`` is fit on
the other folds and scored on the held-out one by ``||M_f T - D_f||^2 / ||D_f||^2``, the share of
the span's change it leaves unexplained. ``T = I`` (plain dropping) is a candidate too, so with
little data the stand-in is left out rather than overfit. The winner is refit on all folds.
Statistics are ``[H, H]`` sums in fp64 per fold (``2K`` matrices per open span), accumulated
block by block; only the open spans' ``m`` and ``y`` are kept (model dtype, real tokens).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import capture_inputs, on_device
from amp_prune.calib.data import Batch

log = logging.getLogger(__name__)

DAMP_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # the dampings ``damp="auto"`` cross-validates, besides T = I
FOLDS = 4


@dataclass
class StandIn:
    """The fitted map of one span: ``t`` ``[H, H]`` fp64 (None: keep ``T = I``, i.e. plain dropping)."""

    span: tuple[int, int]
    t: torch.Tensor | None
    damp: float | None  # the damping used; None when T = I was kept
    scores: dict[str, float] = field(default_factory=dict)  # damp (or "identity") -> held-out unexplained share

    def record(self) -> dict:
        """JSON-able summary for the plan."""
        return {"span": list(self.span), "damp": self.damp, "heldout_unexplained": self.scores}


def spans(removed: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks, as ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(removed)):
        if out and b == out[-1][1] + 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def solve_standin(mtm: torch.Tensor, mtd: torch.Tensor, damp: float) -> torch.Tensor:
    """``T = (M^T M + lam I)^-1 (M^T D + lam I)`` in fp64 (``lam = damp * mean diag``)."""
    h = mtm.shape[0]
    lam = damp * mtm.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(h, dtype=torch.float64, device=mtm.device)
    return torch.linalg.solve(mtm + lam * eye, mtd + lam * eye)


def heldout_error(t: torch.Tensor | None, mtm: torch.Tensor, mtd: torch.Tensor, dtd: torch.Tensor) -> float:
    """``||M T - D||^2 / ||D||^2`` from the fold's sums (``T = I`` when ``t`` is None).

    ``||M T - D||^2 = tr(T^T M^T M T) - 2 tr(T^T M^T D) + ||D||^2``.
    """
    if t is None:
        fit = mtm.diagonal().sum() - 2 * mtd.diagonal().sum()
    else:
        fit = ((mtm @ t) * t).sum() - 2 * (mtd * t).sum()
    return float((fit + dtd) / dtd.clamp(min=1e-30))


def choose(folds: list[list[torch.Tensor]], span: tuple[int, int], damp: float | str) -> StandIn:
    """Fit one span's ``T`` from per-fold sums ``[M^T M, M^T D, ||D||^2]`` (see module docstring)."""
    total = [sum(f[i] for f in folds) for i in range(3)]
    if damp != "auto":
        return StandIn(span, solve_standin(total[0], total[1], float(damp)).cpu(), float(damp))
    if len(folds) < 2:
        log.warning("one calibration batch cannot cross-validate the stand-in damping; using 0.1")
        return StandIn(span, solve_standin(total[0], total[1], 0.1).cpu(), 0.1)
    scores = {"identity": sum(heldout_error(None, *f) for f in folds) / len(folds)}
    for d in DAMP_GRID:
        errs = [heldout_error(solve_standin(total[0] - f[0], total[1] - f[1], d), *f) for f in folds]
        scores[str(d)] = sum(errs) / len(errs)
    best = min(scores, key=scores.get)
    scores = {k: round(v, 5) for k, v in scores.items()}
    if best == "identity":
        log.info("stand-in for blocks %d-%d: no damping beats plain dropping on held-out tokens; none used", *span)
        return StandIn(span, None, None, scores)
    return StandIn(span, solve_standin(total[0], total[1], float(best)).cpu(), float(best), scores)


@torch.no_grad()
def fit_standins(model: nn.Module, spec: ArchSpec, batches: list[Batch], removed: list[int], device: torch.device, *,
                 damp: float | str, progress: bool = True) -> dict[int, StandIn]:
    """``{a-1: StandIn}`` for every span ``a..b`` of ``removed`` with ``a >= 1``, from one pass of the dense ``model``."""
    todo = [(a, b) for a, b in spans(removed) if a >= 1]
    if any(a == 0 for a, _ in spans(removed)):
        log.warning("the dropped span starting at block 0 has no earlier block to fold a stand-in into; it gets none")
    if not todo:
        return {}
    k_folds = min(FOLDS, len(batches)) if damp == "auto" else 1
    starts = {a - 1: (a, b) for a, b in todo}  # last kept block -> span
    ends = {b: a - 1 for a, b in todo}
    layers = spec.get_layers(model)
    states = capture_inputs(model, spec, batches, device)
    kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # block a-1 -> (m, y) per batch, real tokens
    stats: dict[int, list[list]] = {}  # block a-1 -> per fold [M^T M, M^T D, ||D||^2] in fp64
    for i in tqdm(range(max(ends) + 1), desc="stand-in statistics", disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device):
            captured: list[torch.Tensor] = []
            ctx = contextlib.ExitStack()
            if i in starts:
                mlp = spec.mlp_module(layer)
                ctx.callback(mlp.register_forward_hook(lambda _m, _a, out: captured.append(out)).remove)
                stats[i] = [[0.0, 0.0, 0.0] for _ in range(k_folds)]
            with ctx:
                for j, s in enumerate(states):
                    out = layer(s.hidden, **s.kwargs)
                    s.hidden = out[0] if isinstance(out, tuple) else out
                    if i in starts:  # M^T M now; M^T D and ||D||^2 once the span has run
                        m = captured[j][s.mask]
                        acc = stats[i][j % k_folds]
                        acc[0] = acc[0] + m.double().T @ m.double()
                        kept.setdefault(i, []).append((m, s.hidden[s.mask] - m))
        if i in ends:  # the states now hold h_{b+1}
            k = ends[i]
            for j, ((m, y), st) in enumerate(zip(kept.pop(k), states)):
                dd = st.hidden[st.mask].double() - y.double()
                acc = stats[k][j % k_folds]
                acc[1] = acc[1] + m.double().T @ dd
                acc[2] = acc[2] + (dd * dd).sum()
    return {k: choose(folds, starts[k], damp) for k, folds in stats.items()}
