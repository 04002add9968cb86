"""The configuration of a pruning run, shared by the Python API and the CLI.

A pruning run is a :class:`PruneConfig` with nested sections: calibration, width, depth,
evaluation, bias check and runtime. Each field carries its CLI help in ``metadata``, and
``amp_prune.cli`` builds the flags from these fields, so the two cannot drift. This module
owns the choice lists. ``validate()`` is pure: it checks values and combinations, and never
reads a file, a dataset or a model (the pipeline's check stage does that, before any forward
pass).

The flat form (``to_dict()``, ``PruneConfig.from_flat``) keeps one key per CLI flag, exactly
as ``run.json`` has always recorded it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

from amp_prune.config.options import (CRITERIA, DEFAULT_SOURCE, DEPTH_CACHES, DEPTH_DTYPES, GGUF_TYPES, GQA_MODES,
                                      LAYER_CRITERIA, METHODS, MIN_CHUNK_TOKENS, OFFLOADS, RATIO_SCOPES, REFITS,
                                      REPRESENTATIONS, RESCORES, STANDIN_FORMS, _choice, _int_at_least, opt)
from amp_prune.errors import AmpPruneError

@dataclass
class CalibConfig:
    """Calibration text and the held-out chunks that measure perplexity before and after."""

    calib: str = opt(DEFAULT_SOURCE, ".txt/.jsonl/.json file or datasets name (default: packaged C4 sample)")
    calib_config: str | None = opt(None, "datasets config name")
    calib_split: str = opt("train", "datasets split (default %(default)s)")
    calib_field: str = opt("text", "text field (default %(default)s)")
    num_samples: int = opt(64, "calibration sequences (default %(default)s)")
    seq_len: int = opt(512, "tokens per sequence (default %(default)s)")
    batch_size: int = opt(8, "sequences per forward (default %(default)s)")
    eval_samples: int = opt(16, "held-out sequences for perplexity before/after; 0 skips it (default %(default)s)")
    eval_text: str | None = opt(None, "held-out text file for perplexity (default: unused calibration chunks)")
    seed: int = opt(0, "seed of the chunk shuffle and of random scores (default %(default)s)")

    def validate(self) -> None:
        for name, low in (("num_samples", 1), ("seq_len", MIN_CHUNK_TOKENS), ("batch_size", 1), ("eval_samples", 0)):
            _int_at_least(getattr(self, name), low, "--" + name.replace("_", "-"))


@dataclass
class WidthConfig:
    """How width units are scored and grouped."""

    criterion: str = opt("amp", "unit scoring (default %(default)s)", choices=CRITERIA)
    gqa_mode: str = opt("group", "group: remove whole KV groups; heads: remove query heads evenly within groups "
                                 "(default %(default)s)", choices=GQA_MODES)
    attn_units: str = opt("auto", "attention units removed per block (KV groups in group mode, heads per group in "
                                  "heads mode), MLP channels taking the rest of the budget; auto tries every feasible "
                                  "split and keeps the lowest calibration loss; uniform takes the share nearest the "
                                  "uniform one (the rule before auto) (default %(default)s)",
                          metavar="auto|uniform|N")
    refit: str = opt("onepass", "least-squares refit of the kept o_proj/down_proj columns: onepass (dense "
                                "activations, no extra pass), sequential (inputs from the pruned earlier blocks), "
                                "or none (default %(default)s)", choices=REFITS)
    damp: float = opt(0.01, "ridge damping of the refit and the stand-in, as a share of the mean Gram diagonal "
                            "(default %(default)s)")

    def validate(self) -> None:
        _choice(self.criterion, CRITERIA, "--criterion")
        _choice(self.gqa_mode, GQA_MODES, "--gqa-mode")
        _choice(self.refit, REFITS, "--refit")
        if self.attn_units not in ("auto", "uniform") and not str(self.attn_units).isdigit():
            raise AmpPruneError(f"--attn-units must be auto, uniform or a number of units >= 0 (got {self.attn_units})")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 10:
            raise AmpPruneError(f"--damp must be a number in [0, 10) (got {self.damp}); e.g. --damp 0.01")

    @property
    def split(self) -> str | int:
        """``--attn-units``: "auto", "uniform", or the number of units."""
        return self.attn_units if self.attn_units in ("auto", "uniform") else int(self.attn_units)


@dataclass
class DepthConfig:
    """Block dropping (``--method cka``) and the depth side of hybrid."""

    layers: int | None = opt(None, "number of blocks to drop with --method cka")
    layer_criterion: str = opt("cka", "block score for --method cka (default %(default)s)", choices=LAYER_CRITERIA)
    one_shot: bool = opt(False, "score blocks once and drop the top N (large models)")
    representation: str = opt("pooled", "CKA over per-token states or per-sequence means (default %(default)s)",
                              choices=REPRESENTATIONS)
    stand_in: bool = opt(True, "replace each span of dropped blocks by a least-squares fit folded into the "
                               "previous block's down_proj (see --stand-in-form), kept only where it lowers the "
                               "calibration KL to the dense model (default: on)", negatable=True)
    standin_damp: str = opt("auto", "ridge damping of the stand-in: auto picks it per span by 4-fold cross-validation "
                                    "on the calibration batches, and keeps plain dropping where no damping beats it "
                                    "on held-out tokens (default %(default)s)", flag="--stand-in-damp",
                            metavar="auto|X")
    standin_form: str = opt("down", "what the stand-in fits: down (the last kept block's down_proj, refit over its "
                                    "inputs) or map (a linear map of that block's MLP output folded into it, "
                                    "ReplaceMe) (default %(default)s)", flag="--stand-in-form",
                            choices=STANDIN_FORMS)
    compare_refit: bool = opt(False, "hybrid: refit both candidates of every step (width refit, depth stand-in) before "
                                     "comparing their CKA; off by default, as it measured worse on SmolLM2")
    depth_samples: int = opt(16, "calibration sequences the block search uses (CKA compares sequences; 0 = all) "
                                 "(default %(default)s)")
    depth_seq_len: int | None = opt(None, "first tokens of each sequence the block search uses (0 = whole "
                                          "sequences; default 64 with --method cka, 128 with hybrid)")
    depth_cache: str = opt("auto", "where the block search keeps the states entering every block: device, cpu "
                                   "(host RAM), disk (temporary files), recompute (keep none), or auto (device when "
                                   "it fits a quarter of free memory, else cpu, else disk) (default %(default)s)",
                           choices=DEPTH_CACHES)
    depth_dtype: str = opt("auto", "compute dtype of the block search's forward passes (--method cka): model (the "
                                   "model's own), bfloat16 (autocast), or auto (bfloat16 for an fp32 model on a "
                                   "device with native bf16 matmuls: a CUDA GPU that supports it, or a CPU with "
                                   "AVX512-BF16 or AMX; else model) (default %(default)s)", choices=DEPTH_DTYPES)
    rescore: str = opt("bounded", "iterative cka: after each removal rescore only the blocks that can still win under "
                                  "the angle bound (bounded), or every block (all, exact greedy) (default %(default)s)",
                       choices=RESCORES)

    def validate(self) -> None:
        _choice(self.layer_criterion, LAYER_CRITERIA, "--layer-criterion")
        _choice(self.representation, REPRESENTATIONS, "--representation")
        _int_at_least(self.layers, 1, "--layers", optional=True, what="blocks")
        _choice(self.depth_cache, DEPTH_CACHES, "--depth-cache")
        _choice(self.rescore, RESCORES, "--rescore")
        _choice(self.depth_dtype, DEPTH_DTYPES, "--depth-dtype")
        _choice(self.standin_form, STANDIN_FORMS, "--stand-in-form")
        _int_at_least(self.depth_samples, 0, "--depth-samples")
        _int_at_least(self.depth_seq_len, 0, "--depth-seq-len", optional=True)
        if 0 < (self.depth_seq_len or 0) < MIN_CHUNK_TOKENS:
            raise AmpPruneError(f"--depth-seq-len must be 0 (whole sequences) or at least {MIN_CHUNK_TOKENS} "
                                f"(got {self.depth_seq_len})")
        try:
            bad = self.standin_damp != "auto" and not 0 <= float(self.standin_damp) < 1e4
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise AmpPruneError(f"--stand-in-damp must be auto or a number in [0, 10000) (got {self.standin_damp}); "
                                "e.g. --stand-in-damp auto")

    @property
    def standin_ridge(self) -> float | str:
        """``--stand-in-damp``: "auto" or the damping."""
        return "auto" if self.standin_damp == "auto" else float(self.standin_damp)


@dataclass
class EvalConfig:
    """lm-eval tasks and perplexity run on the dense and the pruned model, side by side."""

    eval_tasks: str | None = opt(None, "lm-eval tasks and/or wikitext2, comma-separated ('five' = the usual five); "
                                       "results go to the summary, eval.json and the card", flag="--eval",
                                 metavar="TASKS")
    eval_limit: int | None = opt(None, "first N examples per task (default: all)")
    ppl_windows: int | None = opt(None, "first N WikiText-2 windows of 2048 tokens (default: all; the whole test set "
                                        "takes ~12 min per model for 135M params on 2 CPU cores)")
    data_dir: str | None = opt(None, "local task and bias data (offline; layout of shared/data; default "
                                     "$AMP_PRUNE_DATA_DIR)")

    def validate(self) -> None:
        _int_at_least(self.eval_limit, 1, "--eval-limit", optional=True, what="examples per task")
        _int_at_least(self.ppl_windows, 1, "--ppl-windows", optional=True, what="windows")
        if self.eval_tasks is not None and not [t for t in self.eval_tasks.split(",") if t.strip()]:
            raise AmpPruneError(f"--eval got no task names ('{self.eval_tasks}'); e.g. --eval five,wikitext2")


@dataclass
class BiasConfig:
    """``bias_probe`` on the dense and the pruned model with the same items."""

    bias_check: str | None = opt(None, "compas, adult, crime, bbq or FILE.jsonl (e.g. compas:race); needs --data-dir "
                                       "for the built-in datasets; the comparison goes to the summary, "
                                       "bias_check.json and the card", flag="--bias-check",
                                 metavar="DATASET[:ATTRIBUTE]")
    bias_limit: int | None = opt(200, "items sampled for --bias-check (default %(default)s)")

    def validate(self) -> None:
        _int_at_least(self.bias_limit, 1, "--bias-limit", optional=True)


@dataclass
class RuntimeConfig:
    """Where and how the run executes."""

    device: str = opt("auto", "auto, cpu, cuda, cuda:N (default %(default)s)")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    offload: str = opt("none", "none; cpu (or --offload alone): keep the model in CPU memory and move one block at a "
                       "time to --device; disk: keep the blocks in the checkpoint's files and read one at a time "
                       "(accelerate's disk offload; for models larger than memory)", choices=OFFLOADS, const="cpu")
    max_memory: str | None = opt(None, "with --offload disk: what accelerate may fill before it leaves blocks on disk, "
                                       "e.g. cpu=20GiB or 0=70GiB,cpu=100GiB (default: every block on disk)",
                                 metavar="DEV=SIZE,...")
    progress: bool = opt(True, "hide progress bars", flag="--no-progress")

    def validate(self) -> None:
        if isinstance(self.offload, bool):  # configs written before --offload took a value
            self.offload = "cpu" if self.offload else "none"
        _choice(self.offload, OFFLOADS, "--offload")
        if self.max_memory is not None:
            if self.offload != "disk":
                raise AmpPruneError("--max-memory applies to --offload disk; add --offload disk")
            from amp_prune.io.offload import parse_max_memory
            parse_max_memory(self.max_memory)


SECTIONS = {"calib": CalibConfig, "width": WidthConfig, "depth": DepthConfig, "eval": EvalConfig,
            "bias": BiasConfig, "runtime": RuntimeConfig}


@dataclass
class PruneConfig:
    """What to prune, by how much, how to calibrate, and what to measure. ``validate()`` raises one-line errors."""

    model: str
    ratio: float = opt(0.3, "fraction of ALL parameters to remove (default 0.3); with --method cka it is converted "
                            "to a block count")
    ratio_of: str = opt("all", "what --ratio is a share of: all parameters (default), or the decoder blocks' "
                               "(blocks: embeddings excluded; they are 62.6%% of Gemma 3 270M)", choices=RATIO_SCOPES)
    out: str | None = opt(None, "output directory (default: ./<model>-<criterion><percent>)")
    gguf: str | None = opt(None, "also write model-TYPE.gguf into the output dir, for llama.cpp and Ollama (Llama "
                                 "layout; Gemma 3 from a GGUF)", choices=GGUF_TYPES, metavar="TYPE")
    overwrite: bool = opt(False, "replace an existing output directory")
    method: str = opt("width", "width: AMP heads+channels; cka: drop whole blocks; hybrid: width or depth at each step "
                               "(default %(default)s)", choices=METHODS)
    plan: str | None = opt(None, "replay a pruning_plan.json instead of scoring")
    push_to_hub: str | None = opt(None, "after the verified export, upload the output dir to this hub repo "
                                        "(NAMESPACE/NAME, created if missing; needs `hf auth login`)",
                                  metavar="REPO_ID")
    private: bool = opt(False, "with --push-to-hub: create the repo private")
    calib: CalibConfig = opt(None, "", factory=CalibConfig)
    width: WidthConfig = opt(None, "", factory=WidthConfig)
    depth: DepthConfig = opt(None, "", factory=DepthConfig)
    eval: EvalConfig = opt(None, "", factory=EvalConfig)
    bias: BiasConfig = opt(None, "", factory=BiasConfig)
    runtime: RuntimeConfig = opt(None, "", factory=RuntimeConfig)

    def validate(self) -> PruneConfig:
        """Check every value and combination without touching a file; return ``self`` so calls chain."""
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise AmpPruneError(f"--ratio must be strictly between 0 and 1 (got {self.ratio}); e.g. --ratio 0.3")
        _choice(self.method, METHODS, "--method")
        _choice(self.ratio_of, RATIO_SCOPES, "--ratio-of")
        if self.gguf is not None:
            _choice(self.gguf, GGUF_TYPES, "--gguf")
        if self.ratio_of == "blocks" and self.depth.layers is not None:
            raise AmpPruneError("--ratio-of applies to --ratio; drop it with --layers")
        if self.push_to_hub is not None:
            from amp_prune.io.hub import check_repo_id
            check_repo_id(self.push_to_hub)
        elif self.private:
            raise AmpPruneError("--private applies to --push-to-hub only; add --push-to-hub NAMESPACE/NAME")
        if self.depth.layers is not None and self.method != "cka":
            raise AmpPruneError("--layers is for --method cka; use --ratio with the other methods")
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.runtime.offload == "disk" and self.method == "hybrid" and not self.plan:
            raise AmpPruneError("--offload disk supports --method width and cka (hybrid prunes a working copy of the "
                                "whole model at every step); use --offload cpu with hybrid")
        return self

    @property
    def target_ratio(self) -> float | None:
        """The ratio the user asked for (``None`` when a block count was given instead)."""
        return self.ratio if self.depth.layers is None else None

    def default_out(self) -> str:
        """``<model name>-<criterion><percent>`` in the current directory."""
        name = Path(self.model.rstrip("/")).name.removesuffix(".gguf") or "model"
        if self.method == "cka":
            d = self.depth
            return f"{name}-{d.layer_criterion}-{d.layers}L" if d.layers else f"{name}-{d.layer_criterion}{round(self.ratio * 100)}"
        tag = self.width.criterion if self.method == "width" else "hybrid"
        return f"{name}-{tag}{round(self.ratio * 100)}"

    def to_dict(self) -> dict:
        """The flat form: one key per field of every section (the keys ``run.json`` records)."""
        flat = {}
        for f in fields(self):
            value = getattr(self, f.name)
            flat.update(asdict(value) if is_dataclass(value) else {f.name: value})
        return flat

    @classmethod
    def from_flat(cls, **kwargs) -> PruneConfig:
        """Build from flat keys (``num_samples=16``, ``criterion="random"``, ...), each routed to its section."""
        top = {f.name for f in fields(cls) if f.name not in SECTIONS}
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        owner = {f.name: s for s, sc in SECTIONS.items() for f in fields(sc)}
        direct = {}
        for key, value in kwargs.items():
            if key in top:
                direct[key] = value
            elif key in owner:
                parts[owner[key]][key] = value
            else:
                raise AmpPruneError(f"unknown PruneConfig field '{key}'")
        return cls(**direct, **{s: SECTIONS[s](**v) for s, v in parts.items()})
