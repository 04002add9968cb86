"""Representation similarity: streaming linear CKA, block distances and rank aggregation.

Linear CKA in feature space (Kornblith et al. 2019), for ``X`` ``[N, d1]`` and ``Y`` ``[N, d2]``
with column-centred ``Xc``, ``Yc``:

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)

Only ``d x d`` cross-covariances are formed, never ``N x N`` Gram matrices. They are
accumulated in fp64 from raw sums over batches (``S_xy = sum x y^T``, ``s_x = sum x``), and
centred at the end: ``Xc^T Yc = S_xy - s_x s_y^T / N``.
"""

from __future__ import annotations

import torch


class StreamingCKA:
    """Accumulate ``X`` (the reference) and ``Y`` batch by batch; ``value()`` gives linear CKA."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None

    @staticmethod
    def _add(acc: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        return v if acc is None else acc + v

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows: ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` (same ``n``; any float dtype)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx, self.sy = self._add(self.sx, x.sum(0)), self._add(self.sy, y.sum(0))
        self.sxx, self.syy = self._add(self.sxx, x.T @ x), self._add(self.syy, y.T @ y)
        self.sxy = self._add(self.sxy, x.T @ y)

    def value(self) -> float:
        """Linear CKA of everything added so far (``nan`` for a constant representation)."""
        if self.n == 0:
            raise ValueError("CKA of an empty representation")
        n = self.n
        cxx = self.sxx - torch.outer(self.sx, self.sx) / n
        cyy = self.syy - torch.outer(self.sy, self.sy) / n
        cxy = self.sxy - torch.outer(self.sx, self.sy) / n
        den = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
        return float((cxy.pow(2).sum() / den).item()) if den > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    """Linear CKA of ``x`` ``[N, d1]`` and ``y`` ``[N, d2]``, streamed in row chunks."""
    acc = StreamingCKA()
    for s in range(0, x.shape[0], chunk):
        acc.update(x[s:s + chunk], y[s:s + chunk])
    return acc.value()


def cka_gram(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference Gram-matrix form ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; O(N^2), tests only."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, lm = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(((k * lm).sum() / (k.norm() * lm.norm())).item())


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``arccos(cos(a, b)) / pi`` for ``[N, d]`` inputs -> ``[N]`` (Gromov et al.)."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


def block_influence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ShortGPT Block Influence ``1 - cos(a, b)`` -> ``[N]``."""
    return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def rank_sum(metrics: dict[str, list[float]], higher_is_removable: dict[str, bool]) -> list[float]:
    """Consensus: each metric ranks the candidates (0 = most removable); returns the rank sums.

    ``higher_is_removable[m]`` says whether a larger value of metric ``m`` means the candidate
    is safer to remove (CKA: yes; angular distance, BI, KL: no). Ties share the mean rank.
    """
    names = list(metrics)
    n = len(metrics[names[0]])
    total = torch.zeros(n, dtype=torch.float64)
    for m in names:
        v = torch.tensor(metrics[m], dtype=torch.float64)
        key = -v if higher_is_removable[m] else v
        total += _average_ranks(key)
    return total.tolist()


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for val in torch.unique(v):  # ties -> mean rank
        idx = (v == val).nonzero().flatten()
        if len(idx) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks
