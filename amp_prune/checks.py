"""The checks that run before any forward pass: input files and names, then the request against the loaded model.

An impossible ratio, an out-of-range ``--layers``, a plan made for another model, unknown eval
tasks, missing data files and a bad bias dataset are refused in seconds, with one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import check_source
from amp_prune.config import PruneConfig
from amp_prune.errors import AmpPruneError
from amp_prune.eval.harness import check_tasks, split_eval_spec
from amp_prune.io.faults import tensor_bytes
from amp_prune.io.load import LoadedModel
from amp_prune.plan import PrunePlan
from amp_prune.planners import Job
from amp_prune.width.budget import attn_options, ceiling_phrase, count_params, effective_mode, unit_costs
from amp_prune.width.planner import split_budgets


@dataclass
class Inputs:
    """What the check stage read from disk (no model needed): the replayed plan, eval request, bias items."""

    plan: PrunePlan | None = None
    eval_kwargs: dict | None = None
    bias_data: object | None = None



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


def export_estimate(model: torch.nn.Module, spec: ArchSpec, job: Job, plan: PrunePlan | None) -> int:
    """Bytes the export's tensors will take, estimated before planning: the dense ones less the requested share."""
    total = count_params(model)
    if plan is not None:
        share = plan.target_ratio or 0.0
    elif job.n_blocks is not None:
        share = job.n_blocks * count_params(spec.get_layers(model)[0]) / total
    else:
        share = job.ratio
    return int(tensor_bytes(model) * (1 - share))


def scoped_ratio(config: PruneConfig, model: torch.nn.Module, spec: ArchSpec) -> float:
    """``--ratio`` as a share of all parameters (the planners' unit): as given, or converted from the blocks' share."""
    if config.ratio_of == "all":
        return config.ratio
    return config.ratio * count_params(spec.get_layers(model)) / count_params(model)


def check_model(config: PruneConfig, loaded: LoadedModel, inputs: Inputs, device: torch.device) -> Job:
    """Refuse a request this model cannot satisfy (cheap arithmetic on its shapes, no forward pass)."""
    model, spec = loaded.model, loaded.spec
    dims = spec.dims(model.config)
    job = Job(config=config, spec=spec, device=device, mode=effective_mode(model, spec, config.width.gqa_mode))
    if inputs.plan is not None:
        inputs.plan.check(model.config.model_type, dims)
        return job
    if job.mode != config.width.gqa_mode and config.method != "cka":
        job.notes.append("the model has one query head per KV head (MHA): using --gqa-mode group" if job.mode == "group"
                         else "the model has one KV head, so group mode could remove no attention: using --gqa-mode "
                              "heads")
    total, n = count_params(model), dims["n_layers"]
    block = count_params(spec.get_layers(model)[0])
    ratio = job.ratio = scoped_ratio(config, model, spec)
    asked = f"--ratio {config.ratio}" + (" --ratio-of blocks" if config.ratio_of == "blocks" else "")
    if config.ratio_of == "blocks" and config.depth.layers is None:
        job.notes.append(f"{asked}: {ratio:.4f} of all parameters")
    if config.method == "width":
        split_budgets(model, spec, ratio, job.mode, config.width.split)
    elif config.method == "cka":
        if config.depth.layers is not None:
            job.n_blocks = config.depth.layers
            if not 0 < job.n_blocks < n:
                raise AmpPruneError(f"--layers must be between 1 and {n - 1} for a model with {n} blocks "
                                    f"(got {job.n_blocks})")
        else:
            want = round(ratio * total / block)
            if want > n - 1:
                raise AmpPruneError(f"{asked} with --method cka asks for {want} blocks but at most {n - 1} of {n} can "
                                    f"be dropped ({ceiling_phrase(model, spec, (n - 1) * block)}); lower --ratio or "
                                    "use --method hybrid")
            job.n_blocks = max(want, 1)
            job.notes.append(f"{asked} with --method cka: dropping {job.n_blocks} of {n} blocks "
                             f"(one block is {block / total:.2%} of the parameters)")
    else:
        unit, n_units, chan = unit_costs(model, spec, job.mode)
        most = (n - 1) * block + max(attn_options(model, spec, job.mode)) * unit + (dims["intermediate"] - 1) * chan
        if ratio * total > most:
            raise AmpPruneError(f"{asked} asks for {ratio * total / 1e6:.1f}M parameters but dropping {n - 1} blocks "
                                f"and narrowing the last can give at most {ceiling_phrase(model, spec, most)}; "
                                "lower --ratio")
    return job
