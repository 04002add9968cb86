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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch, build_batches
from amp_prune.checks import Inputs, check_inputs, check_model, export_estimate
from amp_prune.config import CalibConfig, PruneConfig
from amp_prune.eval.agreement import runner_logit_diff, tolerance
from amp_prune.eval.harness import evaluate_model
from amp_prune.eval.perplexity import perplexity
from amp_prune.io.card import model_card
from amp_prune.io.export import check_out_dir, export
from amp_prune.io.faults import check_free_space, check_writable
from amp_prune.io.files import peak_rss_mb, release_freed_memory, versions, write_json
from amp_prune.io.gguf_export import check_gguf_request, gguf_name, plan_description, write_gguf
from amp_prune.io.hub import push_folder, source_metadata
from amp_prune.io.load import ALIASES, LoadedModel, alias_gguf, resolve_device, resolve_dtype
from amp_prune.io.offload import load_placed
from amp_prune.plan import PrunePlan
from amp_prune.planners import PLANNERS, with_method_defaults
from amp_prune.refit import compute_weights, refit_token_notes
from amp_prune.report import plot_steps
from amp_prune.surgery import apply_plan
from amp_prune.width.budget import count_params

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
class Measures:
    """Perplexity, lm-eval results and bias report of one model (dense or pruned)."""

    ppl: float | None = None
    eval: dict | None = None
    bias: dict | None = None


# ---- stages --------------------------------------------------------------------------------------------
def check_runner(model: torch.nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device,
                 dtype: torch.dtype) -> float:
    """The block runner's logits against the model's own forward on ``batches``; raises when they disagree.

    Every score, refit, search and perplexity goes through the runner, so this runs once per run, on the dense
    model, before any of them. Returns the max |difference|.
    """
    diff = runner_logit_diff(model, spec, batches, device)
    if not diff <= tolerance(dtype):
        raise RuntimeError(f"the block runner's logits differ from {type(model).__name__}'s own forward by {diff:.3g} "
                           f"(> {tolerance(dtype)}): amp-prune would score and prune this model wrongly, so it stops "
                           "here; please report it with the model's config.json")
    return diff


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
            "channels": d["intermediate"], "block_params": count_params(spec.get_layers(model))}


def summarize(config: PruneConfig, out: str, plan: PrunePlan, before: dict, after: dict, dense: Measures,
              pruned: Measures, held: list[Batch], notes: list[str]) -> dict:
    """The run summary: shapes before/after, achieved ratio, perplexities, and the side-by-side results."""
    c = config.calib
    s = {"name": out.rstrip("/").split("/")[-1], "source": config.model, "method": describe(config, plan),
         "target_ratio": plan.target_ratio if config.plan else config.target_ratio, "notes": notes,
         "removed_layers": plan.removed_layers, "achieved_ratio": 1 - after["params"] / before["params"],
         "ratio_of": config.ratio_of, "achieved_block_ratio": 1 - after["block_params"] / before["block_params"],
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
    config = with_method_defaults(config)
    t0 = time.perf_counter()
    out = config.out or config.default_out()
    if save:
        check_writable(check_out_dir(out, overwrite=config.overwrite, input_path=None))
    inputs = check_inputs(config)
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.runtime.dtype, device)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_placed(config.model, device, dtype, config.runtime.offload, config.runtime.max_memory)
    if save:
        check_out_dir(out, overwrite=config.overwrite, input_path=loaded.path)
    job = check_model(config, loaded, inputs, device)
    gguf_source = None
    if save:
        check_free_space(Path(out), export_estimate(loaded.model, loaded.spec, job, inputs.plan))
        if config.gguf:  # the source GGUF (whose tokenizer metadata is carried over) is resolved only here
            gguf_source = alias_gguf(config.model, Path(loaded.path) if loaded.path else None)
            check_gguf_request(config.gguf, loaded.model.config.model_type, source_gguf=gguf_source,
                               config=loaded.model.config)
    timings["load_s"] = time.perf_counter() - t
    model, spec = loaded.model, loaded.spec

    t = time.perf_counter()
    calib, held = calibrate(config, loaded.tokenizer)
    timings["calibration_data_s"] = time.perf_counter() - t
    if not config.plan and config.method != "cka" and config.width.refit != "none":
        job.notes += refit_token_notes(spec.dims(model.config), sum(b.num_tokens for b in calib))
    t = time.perf_counter()
    timings["runner_check_max_abs_diff"] = check_runner(model, spec, calib[:1], device, dtype)
    timings["runner_check_s"] = time.perf_counter() - t
    release_freed_memory()
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
    release_freed_memory()  # what planning freed, before surgery, the pruned measures and the export allocate
    t = time.perf_counter()
    apply_plan(model, plan, spec)
    timings["surgery_s"] = time.perf_counter() - t
    pruned = measure(model, loaded, held, inputs, config, device, "pruned", timings)

    summary = summarize(config, out, plan, before, _shape(model, spec), dense, pruned, held, job.notes)
    summary["card_meta"] = source_metadata(config.model, Path(loaded.path) if loaded.path else None,
                                           {n: a.card for n, a in ALIASES.items()})
    result = PruneResult(model=model, tokenizer=loaded.tokenizer, plan=plan, summary=summary, out=None, timings=timings,
                         dense=dense_copy)
    if save:
        release_freed_memory()
        t = time.perf_counter()
        run_info = {"config": config.to_dict(), "seed": config.calib.seed, "versions": versions(),
                    "device": str(device), "dtype": str(dtype), "summary": summary, "timings": timings}
        files = {"pruning_plan.json": plan.to_dict(), "run.json": run_info}
        if "eval" in summary:
            files["eval.json"] = summary["eval"]
        if "bias_check" in summary:
            files["bias_check.json"] = summary["bias_check"]
        writers = [lambda d: plot_steps(plan, d / "layer_scores.png")] if plan.steps else []
        if config.gguf:  # into the same temporary dir: a failure leaves neither a half file nor a half export
            summary["gguf"] = gguf_name(Path(out), config.gguf).name
            writers.append(lambda d: write_gguf(model, loaded.tokenizer, gguf_name(d, config.gguf), config.gguf,
                                                source_gguf=Path(gguf_source) if gguf_source else None,
                                                name=summary["name"], base_model=summary["card_meta"].get("base_model"),
                                                description=plan_description(summary)))
        check = export(model, loaded.tokenizer, out, check_batches=(held or calib)[:1], device=device,
                       files=files, card=lambda diff: model_card(summary, diff), writers=writers,
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
