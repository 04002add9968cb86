"""AMP: activation-projection importance of attention heads and MLP channels.

For block ``l`` and query head ``h`` with ``a_{t,h}`` ``[head_dim]`` the head's slice of the
``o_proj`` input at token ``t`` and ``W_O[h]`` ``[hidden, head_dim]`` the matching columns:

    I_h = (1 / N) * sum_t || W_O[h] a_{t,h} ||_1

For MLP channel ``j`` with ``z_{t,j}`` the ``down_proj`` input (``silu(gate_j) * up_j``):

    I_j = (1 / N) * sum_t |z_{t,j}|

``N`` counts real tokens only (pad positions are masked out); sums are in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import MaskRef
from amp_prune.calib.data import Batch
from amp_prune.width.criteria.base import LayerScores, ScoreContext, score_blockwise

_CHUNK_ELEMS = 2 ** 24  # bound on the [tokens, heads, hidden] temporary (64 MB in fp32)


def head_contributions(x: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Sum over tokens of ``|| W_O[h] a_{t,h} ||_1`` per head.

    ``x`` ``[N, n_heads*head_dim]`` (real tokens only), ``w_o`` ``[hidden, n_heads*head_dim]``;
    returns ``[n_heads]`` fp32.
    """
    hidden = w_o.shape[0]
    head_dim = w_o.shape[1] // n_heads
    w = w_o.float().view(hidden, n_heads, head_dim)
    total = torch.zeros(n_heads, dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMS // (n_heads * hidden))
    for s in range(0, x.shape[0], step):
        a = x[s:s + step].float().view(-1, n_heads, head_dim)
        total += torch.einsum("tnd,hnd->tnh", a, w).abs_().sum(dim=(0, 2))
    return total


class AmpScorer:
    """Accumulates the AMP sums of one block while it runs (see the module docstring)."""

    def __init__(self, spec: ArchSpec, n_heads: int):
        self.spec, self.n_heads = spec, n_heads
        self.heads: dict[int, torch.Tensor] = {}
        self.channels: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def hooks(self, i: int, layer: nn.Module, ref: MaskRef) -> contextlib.AbstractContextManager:
        o_proj, down = self.spec.o_proj(layer), self.spec.down_proj(layer)

        def o_hook(_m, args):
            x = args[0][ref.mask]  # [N, n_heads*head_dim]
            c = head_contributions(x, o_proj.weight, self.n_heads)
            self.heads[i] = c if i not in self.heads else self.heads[i] + c
            self.tokens[i] = self.tokens.get(i, 0) + x.shape[0]

        def d_hook(_m, args):
            z = args[0][ref.mask].float().abs().sum(0)  # [intermediate]
            self.channels[i] = z if i not in self.channels else self.channels[i] + z

        stack = contextlib.ExitStack()
        stack.callback(o_proj.register_forward_pre_hook(o_hook).remove)
        stack.callback(down.register_forward_pre_hook(d_hook).remove)
        return stack

    def finish(self, i: int, layer: nn.Module) -> LayerScores:
        n = max(self.tokens.get(i, 0), 1)
        return LayerScores(heads=(self.heads.pop(i) / n).cpu(), channels=(self.channels.pop(i) / n).cpu())


@torch.no_grad()
def amp_scores(model: nn.Module, spec: ArchSpec, batches: list[Batch], ctx: ScoreContext) -> list[LayerScores]:
    """AMP scores of every block, computed block by block (see module docstring)."""
    return score_blockwise(model, spec, batches, AmpScorer(spec, spec.dims(model.config)["n_heads"]), ctx,
                           desc="AMP scoring")
