"""``prune(config)``: load -> check -> calibrate -> plan -> apply -> measure -> export, one call per stage.

Every check that needs only the config, the input files or the loaded model runs before the
first forward pass: an impossible ratio, an out-of-range ``--layers``, a plan made for another
model, unknown eval tasks, missing data files and a bad bias dataset are refused in seconds.
Every method is a planner (see :data:`PLANNERS`): it returns a :class:`PrunePlan` and leaves
the model alone; :func:`apply_plan` is the only step that changes it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch, build_batches, check_source
from amp_prune.config import CalibConfig, PruneConfig
from amp_prune.depth.cache import depth_batches
from amp_prune.depth.hybrid import plan_hybrid
from amp_prune.depth.search import plan_depth, search_dtype
from amp_prune.errors import AmpPruneError
from amp_prune.eval.harness import check_tasks, evaluate_model, split_eval_spec
from amp_prune.eval.perplexity import perplexity
from amp_prune.io.card import model_card
from amp_prune.io.export import check_out_dir, export
from amp_prune.io.files import peak_rss_mb, versions, write_json
from amp_prune.io.hub import push_folder, source_metadata
from amp_prune.io.load import DEMO_ALIAS, LoadedModel, resolve_device, resolve_dtype
from amp_prune.io.offload import load_placed
from amp_prune.plan import PrunePlan
from amp_prune.refit import compute_weights, refit_token_notes
from amp_prune.report import plot_steps
from amp_prune.surgery import apply_plan
from amp_prune.width.budget import count_params, effective_mode, unit_costs
from amp_prune.width.criteria import ScoreContext
from amp_prune.width.planner import plan_width, split_budgets

log = logging.getLogger(__name__)

# the calibration settings a refit depends on; a plan records them so that a replay recomputes the same weights
REFIT_CALIB_KEYS = ("calib", "calib_config", "calib_split", "calib_field", "num_samples", "seq_len", "batch_size",
                    "seed")


@dataclass
class PruneResult:
    """The pruned in-memory model and what the run measured."""

    model: torch.nn.Module
    tokenizer: object
    plan: PrunePlan
    summary: dict
    out: str | None
    timings: dict[str, float] = field(default_factory=dict)
    dense: torch.nn.Module | None = None  # the unpruned model, kept only with prune(keep_dense=True)


@dataclass
class Inputs:
    """What the check stage read from disk (no model needed): the replayed plan, eval request, bias items."""

    plan: PrunePlan | None = None
    eval_kwargs: dict | None = None
    bias_data: object | None = None


@dataclass
class Job:
    """A request known to be feasible for the loaded model: what the planners need besides the model and data."""

    config: PruneConfig
    spec: ArchSpec
    device: torch.device
    mode: str  # the GQA mode in effect (MHA models use group)
    n_blocks: int | None = None  # blocks to drop (cka)
    notes: list[str] = field(default_factory=list)

    def ctx(self) -> ScoreContext:
        return ScoreContext(device=self.device, seed=self.config.calib.seed, progress=self.config.runtime.progress)


@dataclass
class Measures:
    """Perplexity, lm-eval results and bias report of one model (dense or pruned)."""

    ppl: float | None = None
    eval: dict | None = None
    bias: dict | None = None


# ---- planners: one per method, each (model, calibration batches, job) -> PrunePlan ------------------
def _plan_width(model: torch.nn.Module, calib: list[Batch], job: Job) -> PrunePlan:
    c = job.config
    return plan_width(model, job.spec, calib, ratio=c.ratio, mode=job.mode, criterion=c.width.criterion, ctx=job.ctx(),
                      attn_units=c.width.split, refit=c.width.refit, damp=c.width.damp)


# --depth-seq-len by method, as measured on SmolLM2 (docs/benchmarks.md, docs/results.md): 64 keeps the CKA
# search's blocks as good at half the time; hybrid at 0.3 drops more blocks at 64 and ends 13% worse (187.5 vs 166.2)
SEARCH_SEQ_LEN = {"cka": 64, "hybrid": 128}


def _search_seq_len(config: PruneConfig) -> int | None:
    """``--depth-seq-len``, or the method's default when unset (None for methods without a block search)."""
    return SEARCH_SEQ_LEN.get(config.method) if config.depth.depth_seq_len is None else config.depth.depth_seq_len


def _with_method_defaults(config: PruneConfig) -> PruneConfig:
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
                      ratio=c.ratio, dtype=c.depth.depth_dtype, progress=c.runtime.progress)
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
    return plan_hybrid(model, job.spec, calib, c.ratio, device=job.device, gqa_mode=c.width.gqa_mode,
                       representation=c.depth.representation, seed=c.calib.seed, progress=c.runtime.progress,
                       attn_units=c.width.split, refit=c.width.refit, standin=c.depth.stand_in, damp=c.width.damp,
                       standin_damp=c.depth.standin_ridge, standin_form=c.depth.standin_form,
                       compare_refit=c.depth.compare_refit,
                       search_batches=_search_batches(calib, job), cache=c.depth.depth_cache)


PLANNERS: dict[str, Callable[[torch.nn.Module, list[Batch], Job], PrunePlan]] = {
    "width": _plan_width, "cka": _plan_cka, "hybrid": _plan_hybrid}


# ---- stages --------------------------------------------------------------------------------------------
def check_inputs(config: PruneConfig) -> Inputs:
    """Read and check every input file and name the run will need, before any model is loaded."""
    c = config
    check_source(c.calib.calib)
    if c.calib.eval_text is not None:
        check_source(c.calib.eval_text, "--eval-text")
    inputs = Inputs()
    if c.plan is not None:
        if not Path(c.plan).is_file():
            raise AmpPruneError(f"plan file not found: {c.plan}")
        inputs.plan = PrunePlan.load(c.plan)
        if inputs.plan.needs_weights:
            if not inputs.plan.calibration:
                raise AmpPruneError(f"{c.plan} has a refit or stand-in but no recorded calibration settings")
            check_source(inputs.plan.calibration["calib"])
    if c.eval.eval_tasks is not None:
        tasks, ppl = split_eval_spec(c.eval.eval_tasks)
        check_tasks(tasks, ppl, c.eval.data_dir)
        inputs.eval_kwargs = {"tasks": tasks, "ppl": ppl, "data_dir": c.eval.data_dir, "limit": c.eval.eval_limit,
                              "ppl_max_windows": c.eval.ppl_windows, "batch_size": c.calib.batch_size,
                              "seed": c.calib.seed, "progress": c.runtime.progress}
    if c.bias.bias_check is not None:
        from bias_probe import BiasProbeError, load
        from bias_probe.probe import check_request
        dataset, _, attribute = c.bias.bias_check.partition(":")
        try:  # loaded once here, so the dense and the pruned model see the same sample
            inputs.bias_data = load(dataset, attribute or None, data_dir=c.eval.data_dir, limit=c.bias.bias_limit,
                                    seed=c.calib.seed)
            check_request(inputs.bias_data, batch_size=c.calib.batch_size, seed=c.calib.seed)
        except BiasProbeError as e:
            raise AmpPruneError(f"--bias-check: {e}") from None
    return inputs


def check_model(config: PruneConfig, loaded: LoadedModel, inputs: Inputs, device: torch.device) -> Job:
    """Refuse a request this model cannot satisfy (cheap arithmetic on its shapes, no forward pass)."""
    model, spec = loaded.model, loaded.spec
    dims = spec.dims(model.config)
    job = Job(config=config, spec=spec, device=device, mode=effective_mode(model, spec, config.width.gqa_mode))
    if inputs.plan is not None:
        inputs.plan.check(model.config.model_type, dims)
        return job
    if job.mode != config.width.gqa_mode and config.method != "cka":
        job.notes.append("the model has one query head per KV head (MHA): using --gqa-mode group")
    total, n = count_params(model), dims["n_layers"]
    block = count_params(spec.get_layers(model)[0])
    if config.method == "width":
        split_budgets(model, spec, config.ratio, job.mode, config.width.split)
    elif config.method == "cka":
        if config.depth.layers is not None:
            job.n_blocks = config.depth.layers
            if not 0 < job.n_blocks < n:
                raise AmpPruneError(f"--layers must be between 1 and {n - 1} for a model with {n} blocks "
                                    f"(got {job.n_blocks})")
        else:
            want = round(config.ratio * total / block)
            if want > n - 1:
                raise AmpPruneError(f"--ratio {config.ratio} with --method cka asks for {want} blocks but at most "
                                    f"{n - 1} of {n} can be dropped (ratio <= {(n - 1) * block / total:.2f}); "
                                    "lower --ratio or use --method hybrid")
            job.n_blocks = max(want, 1)
            job.notes.append(f"--ratio {config.ratio} with --method cka: dropping {job.n_blocks} of {n} blocks "
                             f"(one block is {block / total:.2%} of the parameters)")
    else:
        unit, n_units, chan = unit_costs(model, spec, job.mode)
        most = (n - 1) * block + (n_units - 1) * unit + (dims["intermediate"] - 1) * chan
        if config.ratio * total > most:
            raise AmpPruneError(f"--ratio {config.ratio} asks for {config.ratio * total / 1e6:.1f}M parameters but "
                                f"dropping {n - 1} blocks and narrowing the last can give at most {most / 1e6:.1f}M "
                                f"({most / total:.2f} of the model); lower --ratio")
    return job


def calibrate(config: PruneConfig, tokenizer, c: CalibConfig | None = None) -> tuple[list[Batch], list[Batch]]:
    """Calibration batches and held-out batches (see :func:`build_batches`) of ``c`` (default: the config's)."""
    c = c or config.calib
    return build_batches(tokenizer, c.calib, num_samples=c.num_samples, seq_len=c.seq_len, batch_size=c.batch_size,
                         seed=c.seed, eval_samples=c.eval_samples, field=c.calib_field, config=c.calib_config,
                         split=c.calib_split, eval_text=c.eval_text)


def measure(model: torch.nn.Module, loaded: LoadedModel, held: list[Batch], inputs: Inputs, config: PruneConfig,
            device: torch.device, label: str, timings: dict[str, float]) -> Measures:
    """Held-out perplexity, and the requested evaluation and bias check, of ``model`` (``label``: dense/pruned)."""
    m = Measures()
    if held:
        m.ppl = perplexity(model, loaded.spec, held, device, progress=config.runtime.progress,
                           desc=f"perplexity ({label})")
    if inputs.eval_kwargs is not None:
        t = time.perf_counter()
        m.eval = evaluate_model(model, loaded.tokenizer, spec=loaded.spec, device=device, **inputs.eval_kwargs)
        timings[f"eval_{label}_s"] = time.perf_counter() - t
    if inputs.bias_data is not None:
        from bias_probe import run_probe
        t = time.perf_counter()
        m.bias, _ = run_probe(model, loaded.tokenizer, inputs.bias_data, batch_size=config.calib.batch_size,
                              seed=config.calib.seed, progress=config.runtime.progress)
        timings[f"bias_{label}_s"] = time.perf_counter() - t
    return m


def describe(config: PruneConfig, plan: PrunePlan) -> str:
    """One phrase for the method, as the summary and the card show it."""
    refit = f", refit={plan.refit} (damp {plan.damp})" if plan.refit != "none" else ""
    standin = (f", stand-in for the dropped blocks ({plan.standin_form}, damp {plan.standin_ridge})"
               if plan.standin else "")
    if plan.method == "cka":
        return (f"depth, {len(plan.removed_layers)} blocks dropped by {plan.criterion} "
                f"({'one-shot' if config.depth.one_shot else 'iterative'}, {config.depth.representation} "
                f"representation){standin}")
    if plan.method == "hybrid":
        return f"hybrid width+depth (AMP + CKA), gqa_mode={plan.gqa_mode}{refit}{standin}"
    units = f", {plan.attn_units} attention units removed per block" if plan.attn_units is not None else ""
    return f"width, criterion={plan.criterion}, gqa_mode={plan.gqa_mode}{units}{refit}"


def _shape(model: torch.nn.Module, spec: ArchSpec) -> dict:
    d = spec.dims(model.config)
    return {"params": count_params(model), "layers": d["n_layers"], "heads": d["n_heads"], "kv": d["n_kv"],
            "channels": d["intermediate"]}


def summarize(config: PruneConfig, out: str, plan: PrunePlan, before: dict, after: dict, dense: Measures,
              pruned: Measures, held: list[Batch], notes: list[str]) -> dict:
    """The run summary: shapes before/after, achieved ratio, perplexities, and the side-by-side results."""
    c = config.calib
    s = {"name": out.rstrip("/").split("/")[-1], "source": config.model, "method": describe(config, plan),
         "target_ratio": plan.target_ratio if config.plan else config.target_ratio, "notes": notes,
         "removed_layers": plan.removed_layers, "achieved_ratio": 1 - after["params"] / before["params"],
         "ppl_before": dense.ppl if dense.ppl is not None else float("nan"),
         "ppl_after": pruned.ppl if pruned.ppl is not None else float("nan"),
         "ppl_protocol": (f"{sum(b.input_ids.shape[0] for b in held)} held-out chunks of <= {c.seq_len} tokens "
                          f"from {c.eval_text or c.calib + ' (not used for calibration)'}") if held else None}
    for key in ("layers", "params", "heads", "kv", "channels"):
        s[f"{key}_before"], s[f"{key}_after"] = before[key], after[key]
    if len(plan.split) > 1:
        s["split"] = plan.split
    if plan.standin_fit:
        s["standin"] = plan.standin_fit
    if dense.eval is not None:
        s["eval"] = {"dense": dense.eval, "pruned": pruned.eval}
    if dense.bias is not None:
        s["bias_check"] = {"dense": dense.bias, "pruned": pruned.bias}
    return s


def prune(config: PruneConfig, *, save: bool = True, keep_dense: bool = False) -> PruneResult:
    """Run one pruning job (width, depth or hybrid, or a replayed plan) as described by ``config``.

    Exports to ``config.out`` unless ``save`` is False; returns the pruned model and the summary.
    ``keep_dense`` keeps a copy of the unpruned model in ``result.dense`` (a distillation teacher).
    """
    config.validate()
    config = _with_method_defaults(config)
    t0 = time.perf_counter()
    out = config.out or config.default_out()
    if save:
        check_out_dir(out, overwrite=config.overwrite, input_path=None)
    inputs = check_inputs(config)
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.runtime.dtype, device)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_placed(config.model, device, dtype, config.runtime.offload, config.runtime.max_memory)
    if save:
        check_out_dir(out, overwrite=config.overwrite, input_path=loaded.path)
    job = check_model(config, loaded, inputs, device)
    timings["load_s"] = time.perf_counter() - t
    model, spec = loaded.model, loaded.spec

    t = time.perf_counter()
    calib, held = calibrate(config, loaded.tokenizer)
    timings["calibration_data_s"] = time.perf_counter() - t
    if not config.plan and config.method != "cka" and config.width.refit != "none":
        job.notes += refit_token_notes(spec.dims(model.config), sum(b.num_tokens for b in calib))
    before = _shape(model, spec)
    dense = measure(model, loaded, held, inputs, config, device, "dense", timings)

    plan = inputs.plan
    if plan is None:
        t = time.perf_counter()
        plan = PLANNERS[config.method](model, calib, job)
        timings["scoring_s" if config.method == "width" else "search_s"] = time.perf_counter() - t
        timings["planning_peak_rss_mb"] = peak_rss_mb()  # the process's peak so far: load, dense measure, plan
        if device.type == "cuda":
            timings["scoring_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        plan.calibration = {k: v for k, v in config.to_dict().items() if k in REFIT_CALIB_KEYS}
    if plan.needs_weights and plan.weights is None:
        t = time.perf_counter()
        refit_batches = calib
        if inputs.plan is not None:
            recorded = CalibConfig(**{**config.calib.__dict__, **plan.calibration})
            if recorded != config.calib:
                job.notes.append(f"the plan's refit/stand-in is recomputed with its recorded calibration settings "
                                 f"({', '.join(f'{k}={v}' for k, v in plan.calibration.items())})")
                refit_batches, _ = calibrate(config, loaded.tokenizer, recorded)
        plan.weights = compute_weights(model, spec, plan, refit_batches, device, progress=config.runtime.progress)
        timings["refit_s"] = time.perf_counter() - t
    on_disk = config.runtime.offload == "disk"
    if keep_dense and on_disk:
        job.notes.append("--offload disk keeps no dense copy in memory: the distillation teacher is loaded again")
    dense_copy = copy.deepcopy(model) if keep_dense and not on_disk else None
    t = time.perf_counter()
    apply_plan(model, plan, spec)
    timings["surgery_s"] = time.perf_counter() - t
    pruned = measure(model, loaded, held, inputs, config, device, "pruned", timings)

    summary = summarize(config, out, plan, before, _shape(model, spec), dense, pruned, held, job.notes)
    summary["card_meta"] = source_metadata(config.model, Path(loaded.path) if loaded.path else None, DEMO_ALIAS)
    result = PruneResult(model=model, tokenizer=loaded.tokenizer, plan=plan, summary=summary, out=None, timings=timings,
                         dense=dense_copy)
    if save:
        t = time.perf_counter()
        run_info = {"config": config.to_dict(), "seed": config.calib.seed, "versions": versions(),
                    "device": str(device), "dtype": str(dtype), "summary": summary, "timings": timings}
        files = {"pruning_plan.json": plan.to_dict(), "run.json": run_info}
        if "eval" in summary:
            files["eval.json"] = summary["eval"]
        if "bias_check" in summary:
            files["bias_check.json"] = summary["bias_check"]
        check = export(model, loaded.tokenizer, out, check_batches=(held or calib)[:1], device=device, spec=spec,
                       files=files, card=lambda diff: model_card(summary, diff),
                       writers=[lambda d: plot_steps(plan, d / "layer_scores.png")] if plan.steps else None,
                       overwrite=config.overwrite, input_path=loaded.path)
        timings["export_s"] = time.perf_counter() - t
        summary["export_max_abs_diff"] = check.max_abs_diff
        summary["exported_class"] = check.exported_class
        result.out = str(check_out_dir(out, overwrite=True))
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_rss_mb"] = peak_rss_mb()
    if result.out:
        _finish_run_json(Path(result.out) / "run.json", timings=timings, summary=summary)
        if config.push_to_hub:  # only a complete, verified export is uploaded; a failure leaves it in place
            summary["pushed_to"] = push_folder(result.out, config.push_to_hub, private=config.private)
    return result


def _finish_run_json(path: Path, **updates) -> None:
    """Add the final timings and export figures to ``run.json`` (known only after the export), atomically."""
    import json
    data = json.loads(path.read_text())
    data.update(updates)
    write_json(path, data)
