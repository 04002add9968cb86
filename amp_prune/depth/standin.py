"""A least-squares stand-in for each span of dropped blocks, fitted into the last kept block's ``down_proj``.

For a maximal span of dropped blocks ``a..b`` (``a >= 1``), block ``a-1`` is the last kept one.
Its output is ``h = y + B(u)``: ``y`` the residual after its attention (and, in a parallel block,
everything but the MLP), ``u = W_down z + c`` the ``down_proj`` output (``z`` ``[I]`` its input, ``c``
its bias, zero for Llama) and ``B`` what the family adds of it (:meth:`ArchSpec.branch`: ``u``,
Granite's ``r * u``, or a post-norm's ``N(u)``). On the dense model's calibration tokens,
``d = h_{b+1} - y`` is what the residual stream needs from block ``a-1``'s MLP for the span to be
skipped, and ``D = B^-1(d)`` (:meth:`ArchSpec.branch_target`) the ``down_proj`` output that gives
it: exact for ``u`` and ``r * u``; behind a post-norm, which fixes every token's magnitude, ``D``
matches the direction at the current output's scale, and the check in :mod:`amp_prune.refit`
keeps the stand-in only where it brings the model closer to the dense one. Both forms solve one
ridge problem toward a prior ``P`` (rows are tokens: features ``F`` ``[N, f]``, targets ``D`` ``[N, H]``):

    min_X || F X - D ||^2 + lam || X - P ||^2   =>   X = (F^T F + lam I)^-1 (F^T D + lam P),
    lam = damp * mean(diag F^T F)

* ``form="map"`` (ReplaceMe, arXiv 2505.02819): ``F = u``, ``P = I``; ``X = T`` ``[H, H]`` maps the
  ``down_proj`` output, folded as ``W_down <- T^T W_down`` and ``c <- T^T c``.
* ``form="down"``: ``F = z_S`` (the kept ``down_proj`` inputs ``S``), ``D`` less the bias ``c``, and
  ``P = W_S^T`` (the kept, possibly refit, weights); ``X = W_down'^T`` ``[|S|, H]`` replaces them.
  It contains every folded map (``T^T W_S`` is one such ``W_down'``), so it fits the calibration
  at least as well, with ``|S|`` instead of ``H`` unknowns per output.

Either way the config stays a stock Llama, and a drop of nothing gives ``X = P``. A span that
starts at block 0 has no block to fit and gets no stand-in.

``damp="auto"`` chooses the damping per span by K-fold cross-validation over the calibration
batches (batch ``j`` in fold ``j mod K``): for each ``damp`` in :data:`DAMP_GRID`, ``X`` is fit on
the other folds and scored on the held-out one by ``||F_f X - D_f||^2 / ||D_f||^2``, the share of
the span's change it leaves unexplained. ``X = P`` (plain dropping) is a candidate too, so with
little data the stand-in is left out rather than overfit. The winner is refit on all folds.
Statistics are fp64 sums per fold (``F^T F`` ``[f, f]``, ``F^T D`` ``[f, H]``; with the down form on
Llama-3-8B, ``f = 14336``: about 8.5 GB for 4 folds), accumulated block by block; only the open
spans' ``F`` and ``y`` are kept (model dtype, real tokens).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import block_forward, capture_inputs, on_device
from amp_prune.calib.data import Batch

log = logging.getLogger(__name__)

DAMP_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # the dampings ``damp="auto"`` cross-validates, besides X = P
FOLDS = 4
FORMS = ("down", "map")  # what a span's stand-in fits: the last kept down_proj itself, or a map of its output


@dataclass
class StandIn:
    """The fitted solution of one span: ``x`` fp64, ``[H, H]`` (map) or ``[|S|, H]`` (down); None: ``X = P``."""

    span: tuple[int, int]
    x: torch.Tensor | None
    damp: float | None  # the damping used; None when X = P (plain dropping) was kept
    scores: dict[str, float] = field(default_factory=dict)  # damp (or "identity") -> held-out unexplained share
    form: str = "map"

    def record(self) -> dict:
        """JSON-able summary for the plan."""
        return {"span": list(self.span), "form": self.form, "damp": self.damp, "heldout_unexplained": self.scores}


def spans(removed: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks, as ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(removed)):
        if out and b == out[-1][1] + 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def _prior(ftd: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """``P`` ``[f, H]``: ``prior`` (fp64, on ``ftd``'s device), or the identity when None."""
    if prior is None:
        return torch.eye(ftd.shape[0], ftd.shape[1], dtype=torch.float64, device=ftd.device)
    return prior.to(ftd.device, torch.float64)


def solve_standin(ftf: torch.Tensor, ftd: torch.Tensor, damp: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``X = (F^T F + lam I)^-1 (F^T D + lam P)`` in fp64 (``lam = damp * mean diag``; ``P = I`` when None)."""
    f = ftf.shape[0]
    lam = damp * ftf.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(f, dtype=torch.float64, device=ftf.device)
    return torch.linalg.solve(ftf + lam * eye, ftd + lam * _prior(ftd, prior))


def heldout_error(x: torch.Tensor | None, ftf: torch.Tensor, ftd: torch.Tensor, dtd: torch.Tensor,
                  prior: torch.Tensor | None = None) -> float:
    """``||F X - D||^2 / ||D||^2`` from the fold's sums (``X = P`` when ``x`` is None).

    ``||F X - D||^2 = tr(X^T F^T F X) - 2 tr(X^T F^T D) + ||D||^2``.
    """
    if x is None and prior is None:
        fit = ftf.diagonal().sum() - 2 * ftd.diagonal().sum()
    else:
        x = _prior(ftd, prior) if x is None else x
        fit = ((ftf @ x) * x).sum() - 2 * (ftd * x).sum()
    return float((fit + dtd) / dtd.clamp(min=1e-30))


def choose(folds: list[list[torch.Tensor]], span: tuple[int, int], damp: float | str,
           prior: torch.Tensor | None = None, form: str = "map") -> StandIn:
    """Fit one span's ``X`` from per-fold sums ``[F^T F, F^T D, ||D||^2]`` (see module docstring)."""
    total = [sum(f[i] for f in folds) for i in range(3)]
    if damp != "auto":
        return StandIn(span, solve_standin(total[0], total[1], float(damp), prior).cpu(), float(damp), form=form)
    if len(folds) < 2:
        log.warning("one calibration batch cannot cross-validate the stand-in damping; using 0.1")
        return StandIn(span, solve_standin(total[0], total[1], 0.1, prior).cpu(), 0.1, form=form)
    scores = {"identity": sum(heldout_error(None, *f, prior) for f in folds) / len(folds)}
    for d in DAMP_GRID:
        errs = [heldout_error(solve_standin(total[0] - f[0], total[1] - f[1], d, prior), *f, prior) for f in folds]
        scores[str(d)] = sum(errs) / len(errs)
    best = min(scores, key=scores.get)
    scores = {k: round(v, 5) for k, v in scores.items()}
    if best == "identity":
        log.info("stand-in for blocks %d-%d: no damping beats plain dropping on held-out tokens; none used", *span)
        return StandIn(span, None, None, scores, form)
    return StandIn(span, solve_standin(total[0], total[1], float(best), prior).cpu(), float(best), scores, form)


@torch.no_grad()
def fit_standins(model: nn.Module, spec: ArchSpec, batches: list[Batch], removed: list[int], device: torch.device, *,
                 damp: float | str, form: str = "down", bases: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 progress: bool = True) -> dict[int, StandIn]:
    """``{a-1: StandIn}`` for every span ``a..b`` of ``removed`` with ``a >= 1``, from one pass of the dense ``model``.

    ``form="down"`` needs ``bases[a-1] = (S, W_S)``: the kept ``down_proj`` input columns ``S`` ``[|S|]``
    and their weights ``[H, |S|]`` (the prior ``P = W_S^T``); by default every column, as in the model.
    """
    if form not in FORMS:
        raise ValueError(f"stand-in form must be one of {FORMS} (got {form})")
    todo = [(a, b) for a, b in spans(removed) if a >= 1]
    if any(a == 0 for a, _ in spans(removed)):
        log.warning("the dropped span starting at block 0 has no earlier block to fold a stand-in into; it gets none")
    if not todo:
        return {}
    k_folds = min(FOLDS, len(batches)) if damp == "auto" else 1
    starts = {a - 1: (a, b) for a, b in todo}  # last kept block -> span
    ends = {b: a - 1 for a, b in todo}
    layers = spec.get_layers(model)
    bases = dict(bases or {})
    if form == "down":
        for k in starts:
            if k not in bases:
                w = spec.down_proj(layers[k]).weight.detach()
                bases[k] = (torch.arange(w.shape[1]), w.cpu())
    states = capture_inputs(model, spec, batches, device)
    kept: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # block a-1 -> (F, y, u) per batch, real tokens
    stats: dict[int, list[list]] = {}  # block a-1 -> per fold [F^T F, F^T D, ||D||^2] in fp64
    for i in tqdm(range(max(ends) + 1), desc="stand-in statistics", disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device):
            captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # (down_proj input, output) per batch
            ctx = contextlib.ExitStack()
            if i in starts:
                ctx.callback(spec.down_proj(layer).register_forward_hook(lambda _m, a, out: captured.append((a[0], out))).remove)
                stats[i] = [[0.0, 0.0, 0.0] for _ in range(k_folds)]
                cols = bases[i][0].to(device) if form == "down" else None
            with ctx:
                for j, s in enumerate(states):
                    s.hidden = block_forward(layer, i, s)
                    if i in starts:  # F^T F now; F^T D and ||D||^2 once the span has run
                        z, u = (t[s.mask] for t in captured.pop())
                        f = u if form == "map" else z.index_select(-1, cols)
                        acc = stats[i][j % k_folds]
                        acc[0] = acc[0] + f.double().T @ f.double()
                        y = s.hidden[s.mask] - spec.branch(layer, "down", u, model.config)
                        kept.setdefault(i, []).append((f, y, u))
        if i in ends:  # the states now hold h_{b+1}
            k = ends[i]
            for j, ((f, y, u), st) in enumerate(zip(kept.pop(k), states)):
                with on_device(layers[k], device):  # its post-norm and bias (a no-op unless offloaded)
                    dd = spec.branch_target(layers[k], "down", st.hidden[st.mask].double() - y.double(), u.double(),
                                            model.config)
                    bias = spec.down_proj(layers[k]).bias
                    if form == "down" and bias is not None:  # X fits W' z = D - c
                        dd = dd - bias.to(dd)
                acc = stats[k][j % k_folds]
                acc[1] = acc[1] + f.double().T @ dd
                acc[2] = acc[2] + (dd * dd).sum()
    return {k: choose(folds, starts[k], damp, bases[k][1].T if form == "down" else None, form)
            for k, folds in stats.items()}
