"""The planners, one per method: ``(model, calibration batches, job) -> PrunePlan``; none touches the model.

A :class:`Job` is a request that :func:`amp_prune.checks.check_model` found feasible for the loaded
model: what the planners need besides the model and the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.config import PruneConfig
from amp_prune.depth.cache import depth_batches
from amp_prune.depth.hybrid import plan_hybrid
from amp_prune.depth.search import plan_depth, search_dtype
from amp_prune.plan import PrunePlan
from amp_prune.width.criteria import ScoreContext
from amp_prune.width.planner import plan_width


@dataclass
class Job:
    """A request known to be feasible for the loaded model: what the planners need besides the model and data."""

    config: PruneConfig
    spec: ArchSpec
    device: torch.device
    mode: str  # the GQA mode in effect (MHA models use group)
    ratio: float = 0.0  # --ratio as a share of all parameters (converted from --ratio-of blocks by check_model)
    n_blocks: int | None = None  # blocks to drop (cka)
    notes: list[str] = field(default_factory=list)

    def ctx(self) -> ScoreContext:
        return ScoreContext(device=self.device, seed=self.config.calib.seed, progress=self.config.runtime.progress)



def _plan_width(model: torch.nn.Module, calib: list[Batch], job: Job) -> PrunePlan:
    c = job.config
    return plan_width(model, job.spec, calib, ratio=job.ratio, mode=job.mode, criterion=c.width.criterion,
                      ctx=job.ctx(), attn_units=c.width.split, refit=c.width.refit, damp=c.width.damp)


# --depth-seq-len by method, as measured on SmolLM2 (docs/benchmarks.md, docs/results.md): 64 keeps the CKA
# search's blocks as good at half the time; hybrid at 0.3 drops more blocks at 64 and ends 13% worse (187.5 vs 166.2)
SEARCH_SEQ_LEN = {"cka": 64, "hybrid": 128}


def _search_seq_len(config: PruneConfig) -> int | None:
    """``--depth-seq-len``, or the method's default when unset (None for methods without a block search)."""
    return SEARCH_SEQ_LEN.get(config.method) if config.depth.depth_seq_len is None else config.depth.depth_seq_len


def with_method_defaults(config: PruneConfig) -> PruneConfig:
    """``config`` with the defaults that depend on the method filled in, so that ``run.json`` records what ran."""
    unset = config.depth.depth_seq_len is None and not config.plan
    return replace(config, depth=replace(config.depth, depth_seq_len=_search_seq_len(config))) if unset else config


def _search_batches(calib: list[Batch], job: Job) -> list[Batch]:
    """The calibration sequences the block search uses: ``--depth-samples`` x ``--depth-seq-len``."""
    return depth_batches(calib, job.config.depth.depth_samples or None, _search_seq_len(job.config) or None)


def _plan_cka(model: torch.nn.Module, calib: list[Batch], job: Job) -> PrunePlan:
    c = job.config
    plan = plan_depth(model, job.spec, _search_batches(calib, job), job.n_blocks, device=job.device,
                      criterion=c.depth.layer_criterion, iterative=not c.depth.one_shot,
                      representation=c.depth.representation, cache=c.depth.depth_cache, rescore=c.depth.rescore,
                      ratio=job.ratio, dtype=c.depth.depth_dtype, progress=c.runtime.progress)
    cast = search_dtype(model, job.device, c.depth.depth_dtype)
    if cast is not None:
        job.notes.append(f"the block search ran in {str(cast).replace('torch.', '')} (autocast; --depth-dtype "
                         f"{c.depth.depth_dtype}); --depth-dtype model keeps the model's dtype")
    plan.standin = c.depth.stand_in
    plan.standin_damp = c.depth.standin_ridge if c.depth.stand_in else None
    plan.standin_form = c.depth.standin_form
    return plan


def _plan_hybrid(model: torch.nn.Module, calib: list[Batch], job: Job) -> PrunePlan:
    c = job.config
    return plan_hybrid(model, job.spec, calib, job.ratio, device=job.device, gqa_mode=c.width.gqa_mode,
                       representation=c.depth.representation, seed=c.calib.seed, progress=c.runtime.progress,
                       attn_units=c.width.split, refit=c.width.refit, standin=c.depth.stand_in, damp=c.width.damp,
                       standin_damp=c.depth.standin_ridge, standin_form=c.depth.standin_form,
                       compare_refit=c.depth.compare_refit,
                       search_batches=_search_batches(calib, job), cache=c.depth.depth_cache)


PLANNERS: dict[str, Callable[[torch.nn.Module, list[Batch], Job], PrunePlan]] = {
    "width": _plan_width, "cka": _plan_cka, "hybrid": _plan_hybrid}
