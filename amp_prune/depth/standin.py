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
A span that starts at block 0 has no block to fold into and gets no stand-in. Statistics are
``[H, H]`` sums in fp64, accumulated block by block; only the open spans' ``m`` are kept (model dtype).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import capture_inputs, on_device
from amp_prune.calib.data import Batch

log = logging.getLogger(__name__)


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


@torch.no_grad()
def fit_standins(model: nn.Module, spec: ArchSpec, batches: list[Batch], removed: list[int], device: torch.device, *,
                 damp: float, progress: bool = True) -> dict[int, torch.Tensor]:
    """``{a-1: T}`` for every span ``a..b`` of ``removed`` with ``a >= 1``, from one pass of the dense ``model``."""
    todo = [(a, b) for a, b in spans(removed) if a >= 1]
    if any(a == 0 for a, _ in spans(removed)):
        log.warning("the dropped span starting at block 0 has no earlier block to fold a stand-in into; it gets none")
    if not todo:
        return {}
    starts = {a - 1: (a, b) for a, b in todo}  # last kept block -> span
    ends = {b: a - 1 for a, b in todo}
    layers = spec.get_layers(model)
    states = capture_inputs(model, spec, batches, device)
    ms: dict[int, list[torch.Tensor]] = {}  # block a-1 -> its MLP output m per batch (real tokens, model dtype)
    stats: dict[int, list[torch.Tensor]] = {}  # block a-1 -> [M^T M, M^T D] in fp64, D = h_{b+1} - y
    for i in tqdm(range(max(ends) + 1), desc="stand-in statistics", disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device):
            captured: list[torch.Tensor] = []
            ctx = contextlib.ExitStack()
            if i in starts:
                mlp = spec.mlp_module(layer)
                ctx.callback(mlp.register_forward_hook(lambda _m, _a, out: captured.append(out)).remove)
            with ctx:
                for j, s in enumerate(states):
                    out = layer(s.hidden, **s.kwargs)
                    s.hidden = out[0] if isinstance(out, tuple) else out
                    if i in starts:  # M^T M and -M^T y now; + M^T h_{b+1} once the span has run
                        m = captured[j][s.mask]
                        md, yd = m.double(), (s.hidden[s.mask] - m).double()
                        acc = stats.setdefault(i, [0.0, 0.0])
                        acc[0] = acc[0] + md.T @ md
                        acc[1] = acc[1] - md.T @ yd
                        ms.setdefault(i, []).append(m)
        if i in ends:  # the states now hold h_{b+1}
            k = ends[i]
            for m, st in zip(ms.pop(k), states):
                stats[k][1] = stats[k][1] + m.double().T @ st.hidden[st.mask].double()
    return {k: solve_standin(mtm, mtd, damp).cpu() for k, (mtm, mtd) in stats.items()}
