"""Depth pruning: remove whole decoder blocks, chosen by representation similarity.

Iterative CKA (default): at each step, for every remaining block ``i``, skip it and compare
the model's final representation (after the final norm, pad tokens excluded; per-sequence
means by default, or per-token states) with the *unpruned* model's by linear CKA; remove
the block with the highest CKA and repeat.
A prefix cache holds the states entering every block, so candidate ``i`` runs only blocks
``i+1..L-1``: one step costs ``L + L(L-1)/2`` block-forwards instead of ``L(L-1)``.

Other criteria: ``angular`` (Gromov et al.: ``arccos(cos(x_in, x_out)) / pi`` of a block,
mean over tokens), ``bi`` (ShortGPT Block Influence ``1 - cos``), ``kl`` (KL divergence of the
next-token distribution from the unpruned model's, on a token subsample) and ``consensus``
(rank sum of cka, angular, bi and kl).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import BlockInputs, capture_inputs, run_blocks
from amp_prune.calib.data import Batch
from amp_prune.config import LAYER_CRITERIA, REPRESENTATIONS
from amp_prune.depth.similarity import StreamingCKA, angular_distance, block_influence, rank_sum
from amp_prune.errors import AmpPruneError
from amp_prune.plan import DepthStep, PrunePlan

log = logging.getLogger(__name__)

CONSENSUS = ("cka", "angular", "bi", "kl")
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
    use_cache: bool = True
    kl_tokens: int = 512
    progress: bool = True
    ref: list[torch.Tensor] = field(default_factory=list)
    ref_kl: torch.Tensor | None = None
    removed: set[int] = field(default_factory=set)

    @property
    def alive(self) -> list[int]:
        """Original indices of the remaining blocks."""
        return [i for i in range(len(self.spec.get_layers(self.model))) if i not in self.removed]

    def _next(self, i: int) -> int:
        """The remaining block after ``i``, or ``L`` (the key of the final states)."""
        n = len(self.spec.get_layers(self.model))
        return next((j for j in range(i + 1, n) if j not in self.removed), n)

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
        """Next-token log-probabilities ``[n, V]`` of the first ``kl_tokens`` real tokens (always per token)."""
        norm = self.spec.submodule(self.model, self.spec.final_norm)
        rows = torch.cat([norm.to(s.hidden.device)(s.hidden)[s.mask] for s in states])[: self.kl_tokens]
        head = self.spec.submodule(self.model, self.spec.lm_head)
        return F.log_softmax(head(rows.to(head.weight.dtype)).float(), dim=-1)

    def prefix_pass(self, layer_context=None) -> dict[int, list[BlockInputs]]:
        """States entering every remaining block (key ``L`` = after the last block)."""
        cache: dict[int, list[BlockInputs]] = {}
        inputs = capture_inputs(self.model, self.spec, self.batches, self.device)
        cache[len(self.spec.get_layers(self.model))] = run_blocks(
            self.model, self.spec, inputs, self.device, record=cache, layer_context=layer_context, progress=False,
            skip=self.removed)
        return cache

    def set_reference(self, cache: dict[int, list[BlockInputs]]) -> None:
        self.ref = self.represent(cache[max(cache)])
        self.ref_kl = self._kl_rows(cache[max(cache)])

    def cka_to(self, ref: list[torch.Tensor], reps: list[torch.Tensor]) -> float:
        acc = StreamingCKA()
        for a, b in zip(ref, reps):
            acc.update(a.to(b.device), b)
        return acc.value()

    def candidate_states(self, cache: dict[int, list[BlockInputs]], i: int) -> list[BlockInputs]:
        """States after the last block with block ``i`` (original index) skipped as well."""
        if self.use_cache:
            return run_blocks(self.model, self.spec, cache[i], self.device, start=i + 1, skip=self.removed,
                              progress=False)
        return run_blocks(self.model, self.spec, capture_inputs(self.model, self.spec, self.batches, self.device),
                          self.device, skip=self.removed | {i}, progress=False)

    def score(self, cache: dict[int, list[BlockInputs]], metrics: tuple[str, ...], *,
              parent: list[torch.Tensor] | None = None, desc: str = "scoring blocks") -> dict[str, list[float]]:
        """Every requested metric for every remaining block (in order); ``cka_parent`` too when ``parent`` is given."""
        out: dict[str, list[float]] = {m: [] for m in metrics}
        if parent is not None:
            out["cka_parent"] = []
        need_forward = "cka" in metrics or "kl" in metrics or parent is not None
        for i in tqdm(self.alive, desc=desc, disable=not self.progress, leave=False):
            ins, outs = cache[i], cache[self._next(i)]
            if "angular" in metrics or "bi" in metrics:
                a = torch.cat([s.hidden[s.mask] for s in ins])
                b = torch.cat([s.hidden[s.mask] for s in outs])
                if "angular" in metrics:
                    out["angular"].append(angular_distance(a, b).mean().item())
                if "bi" in metrics:
                    out["bi"].append(block_influence(a, b).mean().item())
            if not need_forward:
                continue
            states = self.candidate_states(cache, i)
            reps = self.represent(states)
            if "cka" in metrics:
                out["cka"].append(self.cka_to(self.ref, reps))
            if parent is not None:
                out["cka_parent"].append(self.cka_to(parent, reps))
            if "kl" in metrics:
                logp = self._kl_rows(states)
                out["kl"].append(F.kl_div(logp, self.ref_kl.to(logp.device), log_target=True,
                                          reduction="batchmean").item())
        return out


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


def plan_depth(model: nn.Module, spec: ArchSpec, batches: list[Batch], n_blocks: int, *, device: torch.device,
               criterion: str = "cka", iterative: bool = True, representation: str = "pooled",
               use_cache: bool = True, ratio: float = 0.0, progress: bool = True) -> PrunePlan:
    """Choose ``n_blocks`` blocks to drop; return the plan. ``model`` is never changed (removed blocks are skipped)."""
    n_layers = len(spec.get_layers(model))
    if not 0 < n_blocks < n_layers:
        raise AmpPruneError(f"--layers must be between 1 and {n_layers - 1} for a model with {n_layers} blocks "
                            f"(got {n_blocks})")
    if representation not in REPRESENTATIONS:
        raise AmpPruneError(f"unknown representation '{representation}': choose one of {', '.join(REPRESENTATIONS)}")
    metrics = metrics_for(criterion)
    search = DepthSearch(model, spec, batches, device, representation=representation, use_cache=use_cache,
                         progress=progress)
    steps: list[DepthStep] = []
    cache = search.prefix_pass()
    search.set_reference(cache)
    for step in tqdm(range(n_blocks if iterative else 1), desc=f"{criterion} block removal", disable=not progress):
        alive = search.alive
        scores = search.score(cache, metrics, desc=f"step {step + 1}: scoring {len(alive)} blocks")
        order = choose(scores, criterion)
        pick = [alive[j] for j in (order[:1] if iterative else sorted(order[:n_blocks]))]
        steps.append(DepthStep(step=step, candidates=alive, metrics=scores, removed=pick, score_name=criterion))
        search.removed |= set(pick)
        if iterative and step + 1 < n_blocks:
            cache = search.prefix_pass()
    return PrunePlan.blocks_only(model.config.model_type, spec.dims(model.config), sorted(search.removed),
                                 criterion=criterion, target_ratio=ratio, method="cka", steps=steps)


def random_blocks(n_layers: int, n_blocks: int, seed: int) -> list[int]:
    """A seeded random choice of blocks: the baseline of the depth tests and benchmarks."""
    return sorted(random.Random(seed).sample(range(n_layers), n_blocks))
