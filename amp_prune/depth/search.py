"""Depth pruning: remove whole decoder blocks, chosen by representation similarity.

Iterative CKA (default): at each step, for every remaining block ``i``, skip it and compare
the model's final representation (after the final norm, pad tokens excluded; per-sequence
means by default, or per-token states) with the *unpruned* model's by linear CKA; remove
the block with the highest CKA and repeat.
A prefix cache (:mod:`amp_prune.depth.cache`, placed on the device, in host RAM or on disk) holds
the states entering every block, so candidate ``i`` runs only blocks ``i+1..L-1``: one step costs
at most ``L + L(L-1)/2`` block-forwards instead of ``L(L-1)``. After block ``k`` is removed, only
the states from ``k`` on are recomputed.

Bounded rescoring (``rescore="bounded"``, the default for iterative ``cka``): write
``theta = arccos(CKA)`` (linear CKA is the cosine between centred Gram matrices, so ``theta`` is an
angle on a sphere and obeys the triangle inequality). For a candidate last scored at angle
``theta_i`` on an earlier model ``P`` and the current model ``P'``,

    theta_i' >= theta_i - sum over the removals since of margin * arccos(CKA(P, P'))

under the stated assumption that removing a block from "the model minus ``i``" moves the
representation by at most ``margin`` times what removing it moved the model itself (the angle
``theta(P, P')``, measured for free from the final states). Candidates are rescored in the
order of that lower bound, and rescoring stops once the lower bound of every remaining one
exceeds the best angle found: under the assumption, none of them can win. ``rescore="all"``
rescores every candidate at every step (exact greedy).

Other criteria: ``angular`` (Gromov et al.: ``arccos(cos(x_in, x_out)) / pi`` of a block,
mean over tokens), ``bi`` (ShortGPT Block Influence ``1 - cos``), ``kl`` (KL divergence of the
next-token distribution from the unpruned model's, on a token subsample) and ``consensus``
(rank sum of cka, angular, bi and kl).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import BlockInputs, capture_inputs, kl_sum, run_blocks
from amp_prune.calib.data import Batch
from amp_prune.config import DEPTH_DTYPES, LAYER_CRITERIA, REPRESENTATIONS, RESCORES
from amp_prune.depth.cache import StateCache, choose_placement, estimate_bytes, tokens_of
from amp_prune.depth.similarity import StreamingCKA, rank_sum
from amp_prune.errors import AmpPruneError
from amp_prune.plan import DepthStep, PrunePlan

log = logging.getLogger(__name__)
estimate_log = logging.getLogger("amp_prune.estimate")  # the CLI shows this one without -v

CONSENSUS = ("cka", "angular", "bi", "kl")
DEFAULT_MARGIN = 2.0  # of the bounded rescoring: the exact search needed 0.84 (benchmarks/depth.py search)
HIGHER_IS_REMOVABLE = {"cka": True, "angular": False, "bi": False, "kl": False}


@dataclass
class DepthSearch:
    """Scores blocks of ``model`` against the unpruned reference representation.

    ``removed`` holds blocks (original indices) treated as already gone: every pass skips
    them, so the search never changes ``model``. Candidates are the remaining blocks, in order.
    """

    model: nn.Module
    spec: ArchSpec
    batches: list[Batch]
    device: torch.device
    representation: str = "pooled"
    placement: str = "device"  # where the prefix cache lives: device | cpu | disk | recompute (see depth.cache)
    kl_tokens: int = 512
    progress: bool = True
    ref: list[torch.Tensor] = field(default_factory=list)
    ref_kl: torch.Tensor | None = None
    removed: set[int] = field(default_factory=set)

    @property
    def alive(self) -> list[int]:
        """Original indices of the remaining blocks."""
        return [i for i in range(len(self.spec.get_layers(self.model))) if i not in self.removed]

    def represent(self, states: list[BlockInputs]) -> list[torch.Tensor]:
        """Final-norm hidden states: real tokens ``[n, H]`` per batch, or per-sequence means ``[B, H]``."""
        norm = self.spec.submodule(self.model, self.spec.final_norm)
        out = []
        for s in states:
            h = norm.to(s.hidden.device)(s.hidden)
            if self.representation == "token":
                out.append(h[s.mask].float())
            else:
                m = s.mask.unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float())
        return out

    def _kl_rows(self, states: list[BlockInputs]) -> torch.Tensor:
        """Last-block states ``[n, H]`` of the first ``kl_tokens`` real tokens (always per token), for ``kl_sum``."""
        return torch.cat([s.hidden[s.mask] for s in states])[: self.kl_tokens]

    def prefix_pass(self, layer_context=None, *, keep: bool = True) -> StateCache:
        """States entering every remaining block (key ``L`` = after the last block), placed as ``placement``;
        with ``keep=False`` only the final states are kept (all a representation needs)."""
        cache = StateCache(self.placement if keep else "recompute", self.device, changes=keep)
        inputs = capture_inputs(self.model, self.spec, self.batches, self.device)
        final = run_blocks(self.model, self.spec, inputs, self.device, record=cache, layer_context=layer_context,
                           progress=False, skip=self.removed)
        cache.set_final(len(self.spec.get_layers(self.model)), final)
        return cache

    def advance(self, cache: StateCache, k: int) -> StateCache:
        """The cache after block ``k`` (already in ``removed``) is gone: states before ``k`` are unchanged, so
        only blocks after it are rerun, from the states that entered ``k``."""
        if not cache.has_states(k):  # recompute: nothing stored to restart from
            cache.close()
            return self.prefix_pass()
        states = cache[k]
        cache.pop(k)
        cache.resume()
        n = len(self.spec.get_layers(self.model))
        final = run_blocks(self.model, self.spec, states, self.device, start=k + 1, skip=self.removed, record=cache,
                           progress=False)
        cache.set_final(n, final)
        return cache

    def set_reference(self, cache: StateCache) -> None:
        self.ref = self.represent(cache[max(cache)])
        self.ref_kl = self._kl_rows(cache[max(cache)])

    def cka_to(self, ref: list[torch.Tensor], reps: list[torch.Tensor]) -> float:
        acc = StreamingCKA()
        for a, b in zip(ref, reps):
            acc.update(a.to(b.device), b)
        return acc.value()

    def candidate_states(self, cache: StateCache, i: int) -> list[BlockInputs]:
        """States after the last block with block ``i`` (original index) skipped as well."""
        if cache.has_states(i):
            return run_blocks(self.model, self.spec, cache[i], self.device, start=i + 1, skip=self.removed,
                              progress=False)
        return run_blocks(self.model, self.spec, capture_inputs(self.model, self.spec, self.batches, self.device),
                          self.device, skip=self.removed | {i}, progress=False)

    def cka_of(self, cache: StateCache, i: int) -> float:
        """CKA to the reference of the model with block ``i`` skipped too."""
        return self.cka_to(self.ref, self.represent(self.candidate_states(cache, i)))

    def score(self, cache: StateCache, metrics: tuple[str, ...], *,
              parent: list[torch.Tensor] | None = None, desc: str = "scoring blocks") -> dict[str, list[float]]:
        """Every requested metric for every remaining block (in order); ``cka_parent`` too when ``parent`` is given."""
        out: dict[str, list[float]] = {m: [] for m in metrics}
        if parent is not None:
            out["cka_parent"] = []
        need_forward = "cka" in metrics or "kl" in metrics or parent is not None
        for i in tqdm(self.alive, desc=desc, disable=not self.progress, leave=False):
            if "angular" in metrics or "bi" in metrics:  # tracked while the prefix pass streamed past
                for name, value in zip(("angular", "bi"), cache.changes[i]):
                    if name in metrics:
                        out[name].append(value)
            if not need_forward:
                continue
            states = self.candidate_states(cache, i)
            reps = self.represent(states)
            if "cka" in metrics:
                out["cka"].append(self.cka_to(self.ref, reps))
            if parent is not None:
                out["cka_parent"].append(self.cka_to(parent, reps))
            if "kl" in metrics:
                rows = self._kl_rows(states)
                out["kl"].append(kl_sum(self.model, self.spec, self.ref_kl.to(rows.device), rows, self.device)
                                 / rows.shape[0])
        return out


def angle(cka: float) -> float:
    """``arccos(CKA)``: the angle between centred Gram matrices (``nan`` CKA counts as the largest angle)."""
    return math.pi / 2 if math.isnan(cka) else math.acos(min(max(cka, 0.0), 1.0))


@dataclass
class BoundedRescore:
    """Last fresh angle of each candidate and the slack accumulated since (``margin * theta(P, P')`` per removal)."""

    margin: float
    theta: dict[int, float] = field(default_factory=dict)
    slack: dict[int, float] = field(default_factory=dict)

    def record(self, scored: dict[int, float]) -> None:
        for i, cka in scored.items():
            self.theta[i], self.slack[i] = angle(cka), 0.0

    def moved(self, drift: float) -> None:
        """The model moved by angle ``drift`` (one removal): every stale score loosens by ``margin * drift``."""
        for i in self.slack:
            self.slack[i] += self.margin * drift

    def rescore(self, search: DepthSearch, cache: StateCache, desc: str) -> tuple[dict[str, list[float]], list[int]]:
        """CKA of every candidate that can still win (fresh) or its last score (stale); and the rescored ones."""
        alive = search.alive
        order = sorted(alive, key=lambda i: (self.theta[i] - self.slack[i], i))
        best, fresh = math.inf, {}
        bar = tqdm(total=len(order), desc=desc, disable=not search.progress, leave=False)
        for i in order:
            if self.theta[i] - self.slack[i] > best:
                break
            fresh[i] = search.cka_of(cache, i)
            best = min(best, angle(fresh[i]))
            bar.update()
        bar.close()
        stale = {i: math.cos(self.theta[i]) for i in alive if i not in fresh}
        self.record(fresh)
        return {"cka": [fresh[i] if i in fresh else stale[i] for i in alive]}, sorted(fresh)


def choose(metrics: dict[str, list[float]], criterion: str) -> list[int]:
    """Candidate order, most removable first."""
    if criterion == "consensus":
        key = rank_sum({m: metrics[m] for m in CONSENSUS}, HIGHER_IS_REMOVABLE)
    else:
        key = [-v if HIGHER_IS_REMOVABLE[criterion] else v for v in metrics[criterion]]
    return sorted(range(len(key)), key=lambda i: (key[i], i))


def metrics_for(criterion: str) -> tuple[str, ...]:
    if criterion not in LAYER_CRITERIA:
        raise AmpPruneError(f"unknown --layer-criterion '{criterion}': choose one of {', '.join(LAYER_CRITERIA)}")
    return CONSENSUS if criterion == "consensus" else (criterion,)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU that supports bf16, or a CPU whose
    flags (``/proc/cpuinfo``) list AVX512-BF16 or AMX-BF16 (elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def search_dtype(model: nn.Module, device: torch.device, requested: str) -> torch.dtype | None:
    """The autocast dtype of the search's forward passes (``None``: the model's own dtype).

    ``bfloat16`` autocasts any model not already in bf16; ``auto`` autocasts an fp32 model to bf16
    where :func:`native_bf16` holds (a half-precision model keeps its dtype); scores only need the
    ranking of candidates, and the search runs 1.8x faster in bf16 on a 2-core AVX512-BF16 CPU
    (docs/benchmarks.md).
    """
    if requested not in DEPTH_DTYPES:
        raise AmpPruneError(f"unknown --depth-dtype '{requested}': choose one of {', '.join(DEPTH_DTYPES)}")
    dtype = next(model.parameters()).dtype
    if requested == "bfloat16":
        return None if dtype == torch.bfloat16 else torch.bfloat16
    if requested == "auto" and dtype == torch.float32 and native_bf16(device):
        return torch.bfloat16
    return None


def plan_depth(model: nn.Module, spec: ArchSpec, batches: list[Batch], n_blocks: int, *, device: torch.device,
               criterion: str = "cka", iterative: bool = True, representation: str = "pooled",
               cache: str = "auto", rescore: str = "bounded", margin: float = DEFAULT_MARGIN, ratio: float = 0.0,
               dtype: str = "model", progress: bool = True) -> PrunePlan:
    """Choose ``n_blocks`` blocks to drop; return the plan. ``model`` is never changed (removed blocks are skipped).

    ``cache``: where the prefix cache lives (:data:`amp_prune.depth.cache.PLACEMENTS`); ``rescore``:
    ``bounded`` (see the module docstring; iterative ``cka`` only, others always rescore all) or ``all``;
    ``dtype``: the forward passes' compute dtype (:func:`search_dtype`; CKA sums stay fp64).
    """
    cast = search_dtype(model, device, dtype)
    if cast is not None:
        log.info("block search in %s (autocast)", str(cast).replace("torch.", ""))
    with torch.autocast(device.type, dtype=cast, enabled=True) if cast else contextlib.nullcontext():
        return _plan_depth(model, spec, batches, n_blocks, device=device, criterion=criterion, iterative=iterative,
                           representation=representation, cache=cache, rescore=rescore, margin=margin, ratio=ratio,
                           progress=progress)


def _plan_depth(model: nn.Module, spec: ArchSpec, batches: list[Batch], n_blocks: int, *, device: torch.device,
                criterion: str, iterative: bool, representation: str, cache: str, rescore: str, margin: float,
                ratio: float, progress: bool) -> PrunePlan:
    """:func:`plan_depth` in the caller's dtype context."""
    n_layers = len(spec.get_layers(model))
    if not 0 < n_blocks < n_layers:
        raise AmpPruneError(f"--layers must be between 1 and {n_layers - 1} for a model with {n_layers} blocks "
                            f"(got {n_blocks})")
    if representation not in REPRESENTATIONS:
        raise AmpPruneError(f"unknown representation '{representation}': choose one of {', '.join(REPRESENTATIONS)}")
    if rescore not in RESCORES:
        raise AmpPruneError(f"unknown --rescore '{rescore}': choose one of {', '.join(RESCORES)}")
    metrics = metrics_for(criterion)
    placement = announce_cache(model, spec, batches, device, cache)
    search = DepthSearch(model, spec, batches, device, representation=representation, placement=placement,
                         progress=progress)
    bounded = BoundedRescore(margin) if rescore == "bounded" and criterion == "cka" and iterative else None
    steps: list[DepthStep] = []
    states = search.prefix_pass()
    search.set_reference(states)
    parent = search.ref
    for step in tqdm(range(n_blocks if iterative else 1), desc=f"{criterion} block removal", disable=not progress):
        alive = search.alive
        desc = f"step {step + 1}: scoring {len(alive)} blocks"
        rescored = None
        if bounded is not None and step > 0:
            scores, rescored = bounded.rescore(search, states, desc)
        else:
            scores = search.score(states, metrics, desc=desc)
            if bounded is not None:
                bounded.record(dict(zip(alive, scores["cka"])))
        order = choose(scores, criterion)
        pick = [alive[j] for j in (order[:1] if iterative else sorted(order[:n_blocks]))]
        search.removed |= set(pick)
        drift = None
        if iterative and step + 1 < n_blocks:
            states = search.advance(states, pick[0])
            now = search.represent(states[max(states)])
            drift = angle(search.cka_to(parent, now))
            parent = now
            if bounded is not None:
                bounded.moved(drift)
        steps.append(DepthStep(step=step, candidates=alive, metrics=scores, removed=pick, score_name=criterion,
                               rescored=rescored, drift=drift))
    states.close()
    return PrunePlan.blocks_only(model.config.model_type, spec.dims(model.config), sorted(search.removed),
                                 criterion=criterion, target_ratio=ratio, method="cka", steps=steps)


def announce_cache(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device, cache: str) -> str:
    """Resolve the cache placement and log the estimate (before any forward pass)."""
    d = spec.dims(model.config)
    dtype = next(model.parameters()).dtype
    est = estimate_bytes(batches, d["n_layers"], d["hidden"], dtype)
    placement = choose_placement(cache, est, device)
    estimate_log.info("depth search: %d sequences, %d token positions; a full prefix cache is about %.2f GB "
                      "(%d blocks + 1 x tokens x %d x %s), kept %s", sum(b.input_ids.shape[0] for b in batches),
                      tokens_of(batches), est / 1e9, d["n_layers"], d["hidden"], str(dtype).replace("torch.", ""),
                      {"device": f"on {device}", "cpu": "in host RAM", "disk": "on disk",
                       "recompute": "nowhere (recomputed)"}[placement])
    return placement


def random_blocks(n_layers: int, n_blocks: int, seed: int) -> list[int]:
    """A seeded random choice of blocks: the baseline of the depth tests and benchmarks."""
    return sorted(random.Random(seed).sample(range(n_layers), n_blocks))
