"""``prune(config)``: model -> calibration -> scores -> plan -> surgery -> export."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from amp_prune.calibration import build_batches
from amp_prune.config import PruneConfig
from amp_prune.criteria import ScoreContext, get_criterion
from amp_prune.evaluation import perplexity
from amp_prune.errors import AmpPruneError
from amp_prune.export import check_out_dir, export
from amp_prune.modelio import load_model, resolve_device, resolve_dtype
from amp_prune.hybrid import hybrid_search
from amp_prune.plots import plot_steps
from amp_prune.layer_drop import search_blocks
from amp_prune.plan import LayerPlan, PrunePlan, compute_budget, count_params, effective_mode, make_plan
from amp_prune.surgery import apply_plan
from amp_prune.zeroshot import evaluate_model, split_eval_spec

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned in-memory model and what the run measured."""

    model: torch.nn.Module
    tokenizer: object
    plan: PrunePlan
    summary: dict
    out: str | None
    timings: dict[str, float] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("amp-prune", "torch", "transformers", "accelerate", "safetensors", "datasets", "gguf", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _placement(model: torch.nn.Module, device: torch.device, offload: bool) -> torch.device:
    """Keep the model on the GPU if it fits in 80% of free memory; otherwise run block by block from CPU."""
    if offload:
        return torch.device("cpu")
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.8 * free:
        log.warning("model needs %.1f GiB but %s has %.1f GiB free: keeping it in CPU memory and moving one block "
                    "at a time (as --offload)", need / 2**30, device, free / 2**30)
        return torch.device("cpu")
    return device


def _describe(config: PruneConfig, plan: PrunePlan) -> str:
    if plan.method == "cka":
        return (f"depth, {len(plan.removed_layers)} blocks dropped by {plan.criterion} "
                f"({'one-shot' if config.one_shot else 'iterative'}, {config.representation} representation)")
    if plan.method == "hybrid":
        return f"hybrid width+depth (AMP + CKA), gqa_mode={plan.gqa_mode}"
    return f"width, criterion={plan.criterion}, gqa_mode={plan.gqa_mode}"


def _run_method(config: PruneConfig, model: torch.nn.Module, spec, calib, device: torch.device,
                timings: dict[str, float], notes: list[str]) -> tuple[torch.nn.Module, PrunePlan]:
    """Score/search and apply; returns the pruned model (hybrid may return a new object) and its plan."""
    t = time.perf_counter()
    dims = spec.dims(model.config)
    ctx = ScoreContext(device=device, seed=config.seed, progress=config.progress)
    if config.plan:
        plan = PrunePlan.load(config.plan)
        apply_plan(model, plan, spec)
        timings["surgery_s"] = time.perf_counter() - t
        return model, plan
    if config.method == "cka":
        n_blocks = config.layers
        if n_blocks is None:
            per_block = count_params(spec.get_layers(model)[0])
            n_blocks = min(max(round(config.ratio * count_params(model) / per_block), 1), dims["n_layers"] - 1)
            notes.append(f"--ratio {config.ratio} with --method cka: dropping {n_blocks} of {dims['n_layers']} blocks "
                         f"(one block is {per_block / count_params(model):.2%} of the parameters)")
        removed, steps = search_blocks(model, spec, calib, n_blocks, device=device, criterion=config.layer_criterion,
                                       iterative=not config.one_shot, representation=config.representation,
                                       progress=config.progress)
        plan = PrunePlan(model_type=model.config.model_type, dims=dims, gqa_mode="-", criterion=config.layer_criterion,
                         target_ratio=config.ratio, layers=[LayerPlan(layer=i) for i in range(dims["n_layers"])],
                         removed_layers=removed, method="cka", steps=[asdict(s) for s in steps])
        timings["search_s"] = time.perf_counter() - t
        return model, plan
    if config.method == "hybrid":
        model, plan = hybrid_search(model, spec, calib, config.ratio, device=device, gqa_mode=config.gqa_mode,
                                    representation=config.representation, seed=config.seed, progress=config.progress)
        timings["search_s"] = time.perf_counter() - t
        return model, plan
    mode = effective_mode(model, spec, config.gqa_mode)
    if mode != config.gqa_mode:
        notes.append("the model has one query head per KV head (MHA): using --gqa-mode group")
    budget = compute_budget(model, spec, config.ratio, mode)
    scores = get_criterion(config.criterion)(model, spec, calib, ctx)
    plan = make_plan(model, spec, scores, budget, mode=mode, criterion=config.criterion, ratio=config.ratio)
    timings["scoring_s"] = time.perf_counter() - t
    if device.type == "cuda":
        timings["scoring_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    t = time.perf_counter()
    apply_plan(model, plan, spec)
    timings["surgery_s"] = time.perf_counter() - t
    return model, plan


def prune(config: PruneConfig, *, save: bool = True) -> PruneResult:
    """Run one pruning job (width, depth or hybrid, or a replayed plan) as described by ``config``.

    Exports to ``config.out`` unless ``save`` is False; returns the pruned model and the summary.
    """
    config.validate()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = config.out or config.default_out()
    if save:
        check_out_dir(out, overwrite=config.overwrite, input_path=None)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    t = time.perf_counter()
    # on a GPU, load into CPU memory first and move the model only if it fits (else run block by block)
    loaded = load_model(config.model, device=torch.device("cpu") if device.type == "cuda" else device, dtype=dtype)
    if device.type == "cuda":
        loaded.model.to(_placement(loaded.model, device, config.offload))
    if save:
        check_out_dir(out, overwrite=config.overwrite, input_path=loaded.path)
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    n_layers = spec.dims(model.config)["n_layers"]
    if config.method == "cka" and config.layers is not None and not 0 < config.layers < n_layers:
        raise AmpPruneError(f"--layers must be between 1 and {n_layers - 1} for a model with {n_layers} blocks "
                            f"(got {config.layers})")
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calib, held = build_batches(tok, config.calib, num_samples=config.num_samples, seq_len=config.seq_len,
                                batch_size=config.batch_size, seed=config.seed, eval_samples=config.eval_samples,
                                field=config.calib_field, config=config.calib_config, split=config.calib_split,
                                eval_text=config.eval_text)
    timings["calibration_data_s"] = time.perf_counter() - t
    dims_before = spec.dims(model.config)
    params_before = count_params(model)
    ppl_before = perplexity(model, spec, held, device, progress=config.progress, desc="perplexity (dense)") if held else None

    eval_kwargs = _eval_kwargs(config)
    dense_eval = None
    if eval_kwargs is not None:
        t = time.perf_counter()
        dense_eval = evaluate_model(model, tok, spec=spec, device=device, **eval_kwargs)
        timings["eval_dense_s"] = time.perf_counter() - t

    bias_data = _bias_data(config)
    dense_bias = None
    if bias_data is not None:
        t = time.perf_counter()
        dense_bias = _bias_report(model, tok, bias_data, config)
        timings["bias_dense_s"] = time.perf_counter() - t

    notes: list[str] = []
    model, plan = _run_method(config, model, spec, calib, device, timings, notes)
    dims_after = spec.dims(model.config)
    params_after = count_params(model)
    ppl_after = perplexity(model, spec, held, device, progress=config.progress, desc="perplexity (pruned)") if held else None

    if eval_kwargs is not None:
        t = time.perf_counter()
        pruned_eval = evaluate_model(model, tok, spec=spec, device=device, **eval_kwargs)
        timings["eval_pruned_s"] = time.perf_counter() - t

    if bias_data is not None:
        t = time.perf_counter()
        pruned_bias = _bias_report(model, tok, bias_data, config)
        timings["bias_pruned_s"] = time.perf_counter() - t

    summary = {
        "name": out.rstrip("/").split("/")[-1], "source": config.model, "method": _describe(config, plan),
        "target_ratio": plan.target_ratio if config.plan else (config.ratio if config.layers is None else None),
        "notes": notes,
        "layers_before": dims_before["n_layers"], "layers_after": dims_after["n_layers"],
        "removed_layers": plan.removed_layers,
        "params_before": params_before, "params_after": params_after,
        "achieved_ratio": 1 - params_after / params_before,
        "heads_before": dims_before["n_heads"], "heads_after": dims_after["n_heads"],
        "kv_before": dims_before["n_kv"], "kv_after": dims_after["n_kv"],
        "channels_before": dims_before["intermediate"], "channels_after": dims_after["intermediate"],
        "ppl_before": ppl_before if ppl_before is not None else float("nan"),
        "ppl_after": ppl_after if ppl_after is not None else float("nan"),
        "ppl_protocol": (f"{sum(b.input_ids.shape[0] for b in held)} held-out chunks of <= {config.seq_len} tokens "
                         f"from {config.eval_text or config.calib + ' (not used for calibration)'}") if held else None,
    }
    files = {"pruning_plan.json": plan.to_dict()}
    if dense_eval is not None:
        summary["eval"] = {"dense": dense_eval, "pruned": pruned_eval}
        files["eval.json"] = summary["eval"]
    if dense_bias is not None:
        summary["bias_check"] = {"dense": dense_bias, "pruned": pruned_bias}
        files["bias_check.json"] = summary["bias_check"]
    result = PruneResult(model=model, tokenizer=tok, plan=plan, summary=summary, out=None, timings=timings)
    if save:
        t = time.perf_counter()
        run_info = {"config": config.to_dict(), "seed": config.seed, "versions": versions(), "device": str(device),
                    "dtype": str(dtype), "summary": summary, "timings": timings}
        check = export(model, tok, out, check_batches=(held or calib)[:1], device=device, spec=spec,
                       files={**files, "run.json": run_info}, summary_for_card=summary,
                       writers=[lambda d: plot_steps(plan, d / "layer_scores.png")] if plan.steps else None,
                       overwrite=config.overwrite, input_path=loaded.path)
        timings["export_s"] = time.perf_counter() - t
        summary["export_max_abs_diff"] = check.max_abs_diff
        summary["exported_class"] = check.exported_class
        result.out = str(check_out_dir(out, overwrite=True))
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_rss_mb"] = peak_rss_mb()
    if result.out:
        _rewrite_json(Path(result.out) / "run.json", timings=timings, summary=summary)
    return result


def _eval_kwargs(config: PruneConfig) -> dict | None:
    """Arguments of :func:`evaluate_model` shared by the dense and the pruned run (None: no --eval)."""
    if config.eval_tasks is None:
        return None
    tasks, ppl = split_eval_spec(config.eval_tasks)
    return {"tasks": tasks, "ppl": ppl, "data_dir": config.data_dir, "limit": config.eval_limit,
            "ppl_max_windows": config.ppl_windows, "batch_size": config.batch_size, "seed": config.seed, "progress": config.progress}


def _bias_data(config: PruneConfig):
    """The --bias-check items (loaded once, so dense and pruned see the same sample), or None."""
    if config.bias_check is None:
        return None
    from bias_probe import load
    dataset, _, attribute = config.bias_check.partition(":")
    return load(dataset, attribute or None, data_dir=config.data_dir, limit=config.bias_limit, seed=config.seed)


def _bias_report(model, tokenizer, data, config: PruneConfig) -> dict:
    from bias_probe import run_probe
    report, _ = run_probe(model, tokenizer, data, batch_size=config.batch_size, progress=config.progress)
    return report


def _rewrite_json(path: Path, **updates) -> None:
    """Atomically update top-level keys of a JSON file (final timings are known only after export)."""
    data = json.loads(path.read_text())
    data.update(updates)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
