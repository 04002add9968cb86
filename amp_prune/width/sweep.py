"""One block-by-block sweep that scores, plans, refits and compares attention/MLP splits.

Per block ``i`` (only block ``i`` on the device, as in :mod:`amp_prune.calib.blockwise`):

1. the dense block runs on the dense stream; the criterion's hooks score its units and, for
   the one-pass refit, Gram hooks accumulate ``G`` of the ``o_proj`` and ``down_proj`` inputs
   (or the scorer hands over its own, for ``obs``, which needs the same ``G``);
2. every candidate split picks its units of block ``i`` from those scores (the budget is
   uniform, so a block's choice needs only that block's scores);
3. each candidate's kept ``o_proj`` / ``down_proj`` columns are refit (:mod:`amp_prune.width.refit`);
   one-pass from the dense ``G``, sequential from ``G`` of the candidate's own stream (its
   earlier blocks already pruned and refit; ``down_proj``'s statistics are taken after the
   block's attention is refit);
4. when splits are compared, or the refit is sequential, each candidate's block ``i`` runs on
   that candidate's stream, pruned and refit through hooks (removed units masked out of the
   ``o_proj`` / ``down_proj`` inputs, the refit weights substituted): the model never changes.

The proxy of a split is the next-token loss of its final stream on the first ``PROXY_TOKENS``
calibration positions (without a sequential refit, candidates run on just the batches holding
them); the final-representation CKA to the dense model on the same batches is recorded beside it.
Only one block's Gram matrices exist at a time; the refit weights of every candidate are kept
(on the CPU) until the best split is known.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import (BlockInputs, MaskRef, block_forward, capture_inputs, kl_sum, nll_sum,
                                      on_device)
from amp_prune.calib.data import Batch
from amp_prune.depth.similarity import StreamingCKA
from amp_prune.plan import LayerPlan, kept
from amp_prune.width.budget import Budget
from amp_prune.width.criteria.base import BlockScorer
from amp_prune.width.refit import Gram, refit_columns

PROXY_TOKENS = 4096  # calibration positions scored by the split proxy


@dataclass
class Candidate:
    """One attention/MLP split (``budget``), or fixed per-block removals (``budget`` None: a replayed plan)."""

    budget: Budget | None
    layers: list[LayerPlan] = field(default_factory=list)
    removed: set[int] = field(default_factory=set)  # whole blocks this candidate drops (its stream skips them)
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # block -> {"o": W', "down": W'}
    stream: list[BlockInputs] | None = None
    loss: float | None = None
    cka: float | None = None


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores (stable: ties go to the lower index)."""
    if k <= 0:
        return []
    order = torch.sort(scores.float(), stable=True).indices
    return sorted(order[:k].tolist())


def layer_plan(i: int, heads: torch.Tensor, channels: torch.Tensor, budget: Budget, mode: str,
               d: dict[str, int]) -> LayerPlan:
    """The lowest-scoring units of block ``i``: ``heads`` ``[n_heads]``, ``channels`` ``[intermediate]`` scores."""
    g = d["n_heads"] // d["n_kv"]
    lp = LayerPlan(layer=i, channels=lowest(channels, budget.channels))
    per_group = heads.view(d["n_kv"], g)  # [n_kv, g]
    if mode == "group":
        lp.kv_heads = lowest(per_group.sum(1), budget.attn_units)
        lp.heads = sorted(h for kv in lp.kv_heads for h in range(kv * g, (kv + 1) * g))
    else:
        lp.heads = sorted(kv * g + j for kv in range(d["n_kv"]) for j in lowest(per_group[kv], budget.attn_units))
    return lp


def kept_columns(lp: LayerPlan, d: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept input columns of ``o_proj`` ``[n_kept_heads * hd]`` and of ``down_proj`` ``[n_kept_channels]``."""
    hd = d["head_dim"]
    heads = kept(d["n_heads"], lp.heads)
    cols = torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long)
    return cols, torch.tensor(kept(d["intermediate"], lp.channels), dtype=torch.long)


@contextlib.contextmanager
def substituted(layer: nn.Module, spec: ArchSpec, lp: LayerPlan, d: dict[str, int], weights: dict[str, torch.Tensor],
                *, attention_only: bool = False):
    """Run ``layer`` as if pruned by ``lp`` and refit: ``o_proj(x) -> W_o' x_S + b`` (and ``down_proj`` alike)."""
    o_cols, d_cols = kept_columns(lp, d)
    stack = contextlib.ExitStack()
    for name, lin, cols in (("o", spec.o_proj(layer), o_cols), ("down", spec.down_proj(layer), d_cols)):
        if attention_only and name == "down":
            continue
        w = weights.get(name)
        w = lin.weight[:, cols.to(lin.weight.device)] if w is None else w.to(lin.weight.device, lin.weight.dtype)
        idx = cols.to(lin.weight.device)
        bias = weights.get(f"{name}_bias")  # a folded stand-in map also maps the bias
        bias = None if bias is None else bias.to(lin.weight.device, lin.weight.dtype)

        def hook(mod, args, _out, w=w, idx=idx, bias=bias):
            return F.linear(args[0].index_select(-1, idx), w, mod.bias if bias is None else bias)
        stack.callback(lin.register_forward_hook(hook).remove)
    with stack:
        yield


def _gram_hooks(layer: nn.Module, spec: ArchSpec, ref: MaskRef, grams: dict[str, Gram], names=("o", "down")):
    """Accumulate each projection's input Gram; behind a post-norm, of the rows ``x_t / rms(W x_t)``.

    A post-norm ``N(u) = w * u / rms(u)`` scales token ``t``'s error ``W' x_S - W x`` by ``1 / rms(W x_t)``
    before it reaches the residual, so the refit weights each token by that (:mod:`amp_prune.width.refit`).
    """
    stack = contextlib.ExitStack()
    for name, lin in (("o", spec.o_proj(layer)), ("down", spec.down_proj(layer))):
        if name not in names:
            continue
        g = grams.setdefault(name, Gram())
        norm = spec.post_norm(layer, name)
        if norm is None:
            stack.callback(lin.register_forward_pre_hook(lambda _m, args, g=g: g.add(args[0][ref.mask])).remove)
            continue
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))

        def weighted(_m, args, out, g=g, eps=eps):
            u = out[ref.mask].float()
            g.add(args[0][ref.mask].float() * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps))
        stack.callback(lin.register_forward_hook(weighted).remove)
    return stack


def _run(layer: nn.Module, i: int, states: list[BlockInputs], ref: MaskRef, ctx, *,
         keep: bool = True) -> list[BlockInputs]:
    """Block ``i`` over every batch of ``states`` inside ``ctx``; returns the outputs (or the inputs when not ``keep``)."""
    out = []
    with ctx:
        for s in states:
            ref.mask = s.mask
            out.append(s.with_hidden(block_forward(layer, i, s)))
    return out if keep else states


def _refit(layer: nn.Module, spec: ArchSpec, lp: LayerPlan, d: dict[str, int], grams: dict[str, Gram],
           damp: float, names=("o", "down")) -> dict[str, torch.Tensor]:
    o_cols, d_cols = kept_columns(lp, d)
    out = {}
    for name, lin, cols in (("o", spec.o_proj(layer), o_cols), ("down", spec.down_proj(layer), d_cols)):
        if name in names:
            out[name] = refit_columns(lin.weight.detach(), grams[name].g, cols.to(lin.weight.device), damp).cpu()
    return out


@torch.no_grad()
def sweep(model: nn.Module, spec: ArchSpec, batches: list[Batch], cands: list[Candidate], *, mode: str,
          scorer: BlockScorer | None, refit: str, damp: float, device: torch.device, compare: bool,
          progress: bool = True, desc: str = "width: scoring") -> None:
    """Fill every candidate's per-block plans and refit weights; with ``compare``, their proxies too (see above)."""
    d = spec.dims(model.config)
    layers = spec.get_layers(model)
    dense = capture_inputs(model, spec, batches, device)
    streams = compare or refit == "sequential"
    # the proxy needs only PROXY_TOKENS positions: without a sequential refit, candidates run on that many batches
    n_stream = len(batches) if refit == "sequential" else _covering(batches, PROXY_TOKENS)
    for c in cands:
        c.stream = [s.with_hidden(s.hidden) for s in dense[:n_stream]] if streams else None
    ref = MaskRef()
    # a scorer that accumulates the same dense o_proj/down_proj Grams (obs) hands them to the one-pass refit
    shared = refit == "onepass" and hasattr(scorer, "take_grams") and spec.post_norms is None  # obs: unweighted
    if shared:
        scorer.share_grams = True
    for i in tqdm(range(len(layers)), desc=desc, disable=not progress, leave=False):
        layer = layers[i]
        with on_device(layer, device):
            grams: dict[str, Gram] = {}
            hooks = contextlib.ExitStack()
            if scorer is not None:
                hooks.enter_context(scorer.hooks(i, layer, ref))
            if refit == "onepass" and not shared:
                hooks.enter_context(_gram_hooks(layer, spec, ref, grams))
            dense = _run(layer, i, dense, ref, hooks)
            scores = scorer.finish(i, layer) if scorer is not None else None
            if shared:
                grams = scorer.take_grams()
            for c in cands:
                if c.budget is not None:
                    c.layers.append(layer_plan(i, scores.heads, scores.channels, c.budget, mode, d))
                lp = c.layers[i]
                if i in c.removed:
                    continue
                todo = tuple(n for n, gone in (("o", lp.heads), ("down", lp.channels)) if gone)  # a full one is kept
                if refit == "onepass":
                    c.weights[i] = _refit(layer, spec, lp, d, grams, damp, todo)
                elif refit == "sequential":
                    g: dict[str, Gram] = {}
                    c.weights[i] = {}
                    if "o" in todo:
                        _run(layer, i, c.stream, ref, _gram_hooks(layer, spec, ref, g, ("o",)), keep=False)
                        c.weights[i] = _refit(layer, spec, lp, d, g, damp, ("o",))
                    if "down" in todo:
                        ctx = contextlib.ExitStack()
                        ctx.enter_context(substituted(layer, spec, lp, d, c.weights[i], attention_only=True))
                        ctx.enter_context(_gram_hooks(layer, spec, ref, g, ("down",)))
                        _run(layer, i, c.stream, ref, ctx, keep=False)
                        c.weights[i].update(_refit(layer, spec, lp, d, g, damp, ("down",)))
                if streams:
                    c.stream = _run(layer, i, c.stream, ref, substituted(layer, spec, lp, d, c.weights.get(i, {})))
            del grams
    if compare:
        ref_rep = _pooled(model, spec, dense[:n_stream], device)
        for c in cands:
            c.loss = _calib_loss(model, spec, c.stream, batches[:n_stream], device)
            acc = StreamingCKA()
            for a, b in zip(ref_rep, _pooled(model, spec, c.stream, device)):
                acc.update(a, b)
            c.cka = acc.value()
    for c in cands:
        c.stream = None
    return None


def _covering(batches: list[Batch], tokens: int) -> int:
    """How many leading batches hold at least ``tokens`` real tokens (all of them if they hold fewer)."""
    seen = 0
    for n, b in enumerate(batches, 1):
        seen += b.num_tokens
        if seen >= tokens:
            return n
    return len(batches)


def _pooled(model: nn.Module, spec: ArchSpec, states: list[BlockInputs], device: torch.device) -> list[torch.Tensor]:
    """Per-sequence means ``[B, H]`` of the final-norm states (pads excluded)."""
    norm = spec.submodule(model, spec.final_norm)
    out = []
    with on_device(norm, device):
        for s in states:
            h, m = norm(s.hidden), s.mask.unsqueeze(-1).to(s.hidden.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float())
    return out


def _calib_loss(model: nn.Module, spec: ArchSpec, states: list[BlockInputs], batches: list[Batch],
                device: torch.device, max_tokens: int = PROXY_TOKENS) -> float:
    """Mean next-token cross entropy over the first ``max_tokens`` real positions of the calibration batches."""
    nll, n = 0.0, 0
    for s, b in zip(states, batches):
        for r in range(s.hidden.shape[0]):
            if n >= max_tokens:
                break
            keep = (b.attention_mask[r, 1:] & b.attention_mask[r, :-1]).bool()
            take = int(min(keep.sum(), max_tokens - n))
            if take <= 0:
                continue
            rows = s.hidden[r, :-1][keep.to(s.hidden.device)][:take]
            nll += nll_sum(model, spec, rows, b.input_ids[r, 1:][keep][:take], device)
            n += take
    return nll / max(n, 1)


def calib_kl(model: nn.Module, spec: ArchSpec, ref: list[BlockInputs], states: list[BlockInputs], device: torch.device,
             max_tokens: int = PROXY_TOKENS) -> float:
    """Mean ``KL(p_ref || p)`` of the next-token distributions over the first ``max_tokens`` real positions.

    ``ref`` and ``states`` hold final-block outputs ``[B, T, H]`` of the same batches (``ref``: the dense
    model); logits are formed one sequence at a time, in chunks of positions (:func:`kl_sum`).
    """
    kl, n = 0.0, 0
    for a, b in zip(ref, states):
        for r in range(a.hidden.shape[0]):
            take = int(min(a.mask[r].sum(), max_tokens - n))
            if take <= 0:
                continue
            real = a.mask[r].to(a.hidden.device)
            kl += kl_sum(model, spec, a.hidden[r][real][:take], b.hidden[r][real][:take], device)
            n += take
    return kl / max(n, 1)
