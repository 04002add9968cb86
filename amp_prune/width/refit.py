"""Least-squares refit of what a width plan keeps, and the Gram statistics it needs.

For a projection ``y = W x + b`` (``W`` ``[out, D]``) whose input columns ``S`` are kept, the
refit chooses ``W_S'`` ``[out, |S|]`` so that, on the calibration tokens, the kept columns
reproduce what the dense projection produced from all of its inputs. Ridge toward the kept
weights themselves:

    min  sum_t || W x_t - W_S' x_{t,S} ||^2  +  lam * || W_S' - W_S ||_F^2
    =>   W_S' (G_SS + lam I) = W G_{:,S} + lam W_S,      G = sum_t x_t x_t^T  (real tokens only)

so ``W_S' = (W G[:, S] + lam W[:, S]) (G[S, S] + lam I)^-1`` with ``lam = damp * mean(diag G)``.
Shrinking toward ``W_S`` instead of toward 0 makes a refit with nothing removed the identity
exactly, and a tiny ``damp`` the plain least-squares solution. ``G`` is accumulated in fp32 on
the device; the solve runs in fp64 (Cholesky; the damping is raised tenfold, at most five
times, if ``G`` is too ill-conditioned, and the kept weights are returned unchanged when
``G`` is zero). The bias is not refit: the target carries the same ``b``.

With a whole KV group removed, the kept heads' outputs are unchanged, so for ``o_proj`` this
is exact linear algebra on its input. ``down_proj``'s input is ``silu(gate) * up``.

Behind a post-norm (Gemma 2/3, OLMo 2, EXAONE 4: the residual adds ``N(W x_t)``, ``N(u) = w * u /
rms(u)``), what reaches the residual from the error ``e_t = W' x_S - W x_t`` is, to first order,
``w * e_t / rms(W x_t)`` less its component along ``W x_t`` (which the norm removes). The refit
weights each token by ``s_t = 1 / rms(W x_t)``: ``G = sum_t s_t^2 x_t x_t^T`` (the rows handed to
:class:`Gram` are ``s_t x_t``; the per-channel ``w`` scales whole output rows, which are fit
independently, so it does not change the solution). An exact fit stays exact either way.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

class Gram:
    """``G = sum_t x_t x_t^T`` ``[D, D]`` over real tokens, accumulated in fp32 on the input's device.

    ``G`` is symmetric, so each batch adds only the blocks on and above the block diagonal
    (``BLOCKS`` column blocks ``b_j``: ``G[:e_j, b_j] += x[:, :e_j]^T x[:, b_j]``), 5/8 of the
    multiply-adds of ``x^T x``, the refit's main cost (``N * D^2`` per projection). Reading
    :attr:`g` copies the upper blocks onto the lower ones in place (no temporary ``[D, D]``).
    """

    BLOCKS = 4  # measured on SmolLM2's down_proj (D = 1536): 4 blocks 0.38-0.44 s, a full addmm 0.65 s

    def __init__(self) -> None:
        self._g: torch.Tensor | None = None
        self._bounds: list[int] = []
        self._lower_stale = False
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[N, D]`` (real tokens only)."""
        if x.shape[0] == 0:
            return
        x = x.detach().float()
        if self._g is None:
            d = x.shape[1]
            self._g = torch.zeros(d, d, dtype=torch.float32, device=x.device)
            self._bounds = [d * j // self.BLOCKS for j in range(self.BLOCKS + 1)]
        b = self._bounds
        for s, e in zip(b[:-1], b[1:]):
            if e > s:
                self._g[:e, s:e].addmm_(x[:, :e].T, x[:, s:e])
        self._lower_stale = True
        self.n += x.shape[0]

    @property
    def g(self) -> torch.Tensor | None:
        """The accumulated ``G`` ``[D, D]`` (fp32, symmetric), or None before any rows were added."""
        if self._lower_stale:
            b = self._bounds
            for j in range(self.BLOCKS):
                for i in range(j + 1, self.BLOCKS):  # block (i, j) below the diagonal blocks = block (j, i)^T
                    self._g[b[i]:b[i + 1], b[j]:b[j + 1]].copy_(self._g[b[j]:b[j + 1], b[i]:b[i + 1]].T)
            self._lower_stale = False
        return self._g


def refit_columns(w: torch.Tensor, gram: torch.Tensor | None, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """``W_S'`` ``[out, |S|]`` for ``w`` ``[out, D]``, Gram ``[D, D]`` and kept columns ``keep`` (see module docstring).

    Returns ``w[:, keep]`` unchanged (in ``w``'s dtype) when there are no statistics.
    """
    kept = w[:, keep]
    if gram is None or not torch.isfinite(gram).all():
        return kept.clone()
    g = gram.double().to(w.device)
    scale = g.diagonal().mean()
    if scale <= 0:
        return kept.clone()
    wd = w.double()
    g_ss = g[keep][:, keep]
    rhs = wd @ g[:, keep]  # [out, |S|]
    lam = damp * scale
    eye = torch.eye(len(keep), dtype=torch.float64, device=w.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g_ss + lam * eye)
        if int(info) == 0:
            # W_S' A = R with A symmetric  <=>  A W_S'^T = R^T
            sol = torch.cholesky_solve((rhs + lam * wd[:, keep]).T, chol).T
            if torch.isfinite(sol).all():
                return sol.to(w.dtype)
        lam = max(lam * 10, 1e-12 * float(scale))
    log.warning("refit: the Gram matrix is too ill-conditioned even with damping %.1e; keeping the weights", lam)
    return kept.clone()
