"""OBS: remove the units that the least-squares refit repairs best (a structured Optimal Brain Surgeon).

For a projection ``y = W x`` (``W`` ``[out, D]``) with ``G = sum_t x_t x_t^T`` ``[D, D]`` over the
real calibration tokens and ``H = G + lam I`` (``lam = damp * mean(diag G)``, the refit's ridge),
removing the input columns ``Q`` and refitting the rest optimally raises the refit's objective
``sum_t ||W x_t - W_S' x_{t,S}||^2 + lam ||W_S' - W_S||^2`` by

    E(Q) = tr( W_Q (Hinv_QQ)^-1 W_Q^T ),      W_Q = W[:, Q],  Hinv = H^-1,

and leaves the compensated weights and the inverse of the kept block of ``H``

    W    <- W    - W_Q (Hinv_QQ)^-1 Hinv_{Q,:}
    Hinv <- Hinv - Hinv_{:,Q} (Hinv_QQ)^-1 Hinv_{Q,:}.

Greedy backward elimination with these updates (as in ZipLM, 2302.04089, and SlimGPT, 2412.18110;
written here from the equations):

- MLP channels of ``down_proj``: ``CHUNKS`` steps per block, each removing the ``D / CHUNKS``
  alive channels of lowest single-channel cost ``E_j = ||W_:,j||^2 / Hinv_jj`` together;
- query heads of ``o_proj``: one head (its ``head_dim`` columns) per step, the lowest ``E(Q_h)``.

A unit's score is its position in the elimination order (0 = removed first), so the lowest ``m``
are exactly the first ``m`` removed, for every budget and split. In group mode the planner ranks a
KV group by the sum of its heads' positions. The refit of the kept columns minimises the same
objective, so with ``--refit onepass`` this criterion chooses what the refit can best repair; with
``--refit none`` it still ranks units by what their removal costs the projection's output.
``G`` is accumulated in fp32 on the device, the elimination runs in fp64 there. Memory: one
block at a time, ``G`` of ``down_proj`` (``D^2`` fp32) and ``Hinv`` (``D^2`` fp64), the updates in
place: about 2.5 GB for Llama-3-8B's 14,336 channels. With ``--refit onepass`` the sweep's refit
reads these same Gram matrices (:meth:`ObsScorer.take_grams`) instead of accumulating its own.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import MaskRef
from amp_prune.calib.data import Batch
from amp_prune.width.criteria.base import LayerScores, ScoreContext, score_blockwise
from amp_prune.width.refit import Gram

DAMP = 0.01  # the refit's default ridge (docs/results.md: flat from 0.001 to 0.1)
CHUNKS = 96  # elimination steps per block for the MLP channels
log = logging.getLogger(__name__)


def _inverse(g: torch.Tensor, damp: float) -> torch.Tensor | None:
    """``(G + lam I)^-1`` in fp64 (damping raised tenfold on failure), or None when ``G`` carries nothing."""
    g = g.double()
    scale = g.diagonal().mean()
    if not torch.isfinite(g).all() or scale <= 0:
        return None
    lam = damp * float(scale)
    eye = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        lam *= 10
    return None


def elimination_order(w: torch.Tensor, gram: torch.Tensor | None, groups: list[list[int]], per_step: int,
                      damp: float = DAMP) -> torch.Tensor:
    """Elimination position of every group of input columns of ``w`` ``[out, D]`` (see module docstring).

    ``groups``: the column lists of the units (one column per MLP channel, ``head_dim`` per head);
    ``per_step``: units removed together per step (their single-unit costs chosen at the step's start).
    Returns ``[len(groups)]`` fp32 on the CPU: 0 for the unit removed first. Without statistics
    (no tokens) it falls back to the columns' weight norms.
    """
    n = len(groups)
    if gram is not None:
        w = w.to(gram.device)  # where the statistics were accumulated (the scoring device)
    hinv = None if gram is None else _inverse(gram, damp)
    if hinv is None:
        log.warning("obs: no calibration statistics for a projection; ranking its units by weight norm")
        norms = torch.stack([w[:, c].float().norm() for c in groups])
        out = torch.empty(n)
        out[torch.sort(norms.cpu(), stable=True).indices] = torch.arange(n, dtype=torch.float32)
        return out
    w = w.double().clone()
    idx = torch.tensor(groups, device=w.device)  # [n, k]
    k = idx.shape[1]
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    order: list[int] = []
    while len(order) < n:
        wq = w[:, idx].permute(1, 0, 2)  # [n, out, k]
        blocks = hinv[idx.unsqueeze(-1), idx.unsqueeze(1)]  # [n, k, k]
        if k == 1:
            cost = (wq.squeeze(-1) ** 2).sum(1) / blocks.view(n).clamp(min=1e-300)
        else:
            chol, _ = torch.linalg.cholesky_ex(blocks + torch.diag_embed((~alive).double()[:, None].expand(n, k)))
            cost = (torch.cholesky_solve(wq.transpose(1, 2), chol) * wq.transpose(1, 2)).sum((1, 2))
        cost = torch.where(alive, cost.nan_to_num(nan=float("inf")), torch.full_like(cost, float("inf")))
        take = torch.topk(cost, min(per_step, n - len(order)), largest=False).indices
        order += take.tolist()
        q = idx[take].reshape(-1)
        inv_qq = torch.linalg.pinv(hinv[q][:, q], hermitian=True)  # [|Q|, |Q|]
        row = inv_qq @ hinv[q, :]  # [|Q|, D]
        w.addmm_(w[:, q], row, alpha=-1)  # in place: no [D, D] temporary
        hinv.addmm_(hinv[:, q], row, alpha=-1)
        alive[take] = False
        w[:, q] = 0
        hinv[q, :] = 0
        hinv[:, q] = 0
        hinv[q, q] = 1.0  # removed columns: a unit diagonal keeps the cost formula finite
    out = torch.empty(n)
    out[torch.tensor(order)] = torch.arange(n, dtype=torch.float32)
    return out


class ObsScorer:
    """Accumulates the ``o_proj`` and ``down_proj`` input Grams of one block, then eliminates (module docstring)."""

    def __init__(self, spec: ArchSpec, n_heads: int, head_dim: int):
        self.spec, self.n_heads, self.head_dim = spec, n_heads, head_dim
        self.grams: dict[tuple[int, str], Gram] = {}
        self.share_grams = False  # set by a sweep whose one-pass refit reads the same statistics
        self._shared: dict[str, Gram] = {}

    def take_grams(self) -> dict[str, Gram]:
        """The ``{"o", "down"}`` Grams of the block last finished, handed over once (only with ``share_grams``).

        They are the dense ``o_proj`` / ``down_proj`` input statistics over the real tokens, exactly
        what a one-pass refit accumulates, so the sweep reads them instead of computing them twice.
        """
        out, self._shared = self._shared, {}
        return out

    def hooks(self, i: int, layer: nn.Module, ref: MaskRef) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for name, lin in (("o", self.spec.o_proj(layer)), ("down", self.spec.down_proj(layer))):
            g = self.grams.setdefault((i, name), Gram())
            stack.callback(lin.register_forward_pre_hook(lambda _m, args, g=g: g.add(args[0][ref.mask])).remove)
        return stack

    def finish(self, i: int, layer: nn.Module) -> LayerScores:
        o, down = self.spec.o_proj(layer).weight.detach(), self.spec.down_proj(layer).weight.detach()
        gram_o, gram_d = self.grams.pop((i, "o")), self.grams.pop((i, "down"))
        if self.share_grams:
            self._shared = {"o": gram_o, "down": gram_d}
        g_o, g_d = gram_o.g, gram_d.g
        hd = self.head_dim
        heads = elimination_order(o, g_o, [list(range(h * hd, (h + 1) * hd)) for h in range(self.n_heads)], 1)
        d = down.shape[1]
        channels = elimination_order(down, g_d, [[j] for j in range(d)], max(1, d // CHUNKS))
        return LayerScores(heads=heads, channels=channels)


@torch.no_grad()
def obs_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    """OBS elimination positions of every block's heads and channels, computed block by block."""
    d = spec.dims(model.config)
    return score_blockwise(model, spec, batches, ObsScorer(spec, d["n_heads"], d["head_dim"]), ctx,
                           desc="OBS scoring")
