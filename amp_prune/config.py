"""The configuration of one pruning run, shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from amp_prune.calibration import DEFAULT_SOURCE, MIN_CHUNK_TOKENS
from amp_prune.criteria import CRITERIA
from amp_prune.errors import AmpPruneError
from amp_prune.layer_drop import LAYER_CRITERIA, REPRESENTATIONS
from amp_prune.plan import GQA_MODES

METHODS = ("width", "cka", "hybrid")


@dataclass
class PruneConfig:
    """What to prune, by how much, and how to calibrate. ``validate()`` raises one-line errors."""

    model: str
    ratio: float = 0.3
    out: str | None = None
    method: str = "width"  # width (AMP) | cka (drop blocks) | hybrid
    layers: int | None = None  # blocks to drop with method=cka (else derived from ratio)
    layer_criterion: str = "cka"
    one_shot: bool = False  # cka: score once and drop the top N, instead of rescoring after each removal
    representation: str = "pooled"  # CKA over per-sequence mean-pooled states (measured best) or per-token ones
    criterion: str = "amp"
    gqa_mode: str = "group"
    calib: str = DEFAULT_SOURCE
    calib_config: str | None = None
    calib_split: str = "train"
    calib_field: str = "text"
    num_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    eval_samples: int = 16
    eval_text: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    offload: bool = False
    overwrite: bool = False
    progress: bool = True
    plan: str | None = None  # replay this pruning_plan.json instead of scoring
    eval_tasks: str | None = None  # lm-eval tasks (and/or "wikitext2") to run on dense and pruned, e.g. "five"
    eval_limit: int | None = None  # first N examples per task
    ppl_windows: int | None = None  # first N WikiText-2 windows (None: the whole test set)
    data_dir: str | None = None  # local task data (offline); None = lm-eval's stock datasets
    bias_check: str | None = None  # bias_probe dataset (optionally DATASET:ATTRIBUTE) run on dense and pruned
    bias_limit: int | None = 200  # items sampled for --bias-check (None: all)

    def validate(self) -> PruneConfig:
        """Check every field; return ``self`` so calls chain."""
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise AmpPruneError(f"--ratio must be strictly between 0 and 1 (got {self.ratio}); e.g. --ratio 0.3")
        if self.method not in METHODS:
            raise AmpPruneError(f"unknown --method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.layer_criterion not in LAYER_CRITERIA:
            raise AmpPruneError(f"unknown --layer-criterion '{self.layer_criterion}': choose one of "
                                f"{', '.join(LAYER_CRITERIA)}")
        if self.representation not in REPRESENTATIONS:
            raise AmpPruneError(f"unknown --representation '{self.representation}': choose one of "
                                f"{', '.join(REPRESENTATIONS)}")
        if self.layers is not None:
            if self.method != "cka":
                raise AmpPruneError("--layers is for --method cka; use --ratio with the other methods")
            if not isinstance(self.layers, int) or self.layers <= 0:
                raise AmpPruneError(f"--layers must be a positive number of blocks (got {self.layers})")
        if self.criterion not in CRITERIA:
            raise AmpPruneError(f"unknown --criterion '{self.criterion}': choose one of {', '.join(CRITERIA)}")
        if self.gqa_mode not in GQA_MODES:
            raise AmpPruneError(f"unknown --gqa-mode '{self.gqa_mode}': choose one of {', '.join(GQA_MODES)}")
        for name, low in (("num_samples", 1), ("seq_len", MIN_CHUNK_TOKENS), ("batch_size", 1), ("eval_samples", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise AmpPruneError(f"--{name.replace('_', '-')} must be an integer >= {low} (got {value})")
        if self.plan is not None and not Path(self.plan).is_file():
            raise AmpPruneError(f"plan file not found: {self.plan}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise AmpPruneError(f"--eval-limit must be a positive number of examples per task (got {self.eval_limit})")
        if self.ppl_windows is not None and (not isinstance(self.ppl_windows, int) or self.ppl_windows < 1):
            raise AmpPruneError(f"--ppl-windows must be a positive number of windows (got {self.ppl_windows})")
        if self.eval_tasks is not None:
            from amp_prune.zeroshot import check_data, split_eval_spec
            tasks, ppl = split_eval_spec(self.eval_tasks)
            check_data(tasks, ppl, self.data_dir)
        if self.bias_check is not None:
            from bias_probe import BiasProbeError, load
            dataset, _, attribute = self.bias_check.partition(":")
            try:
                data = load(dataset, attribute or None, data_dir=self.data_dir, limit=self.bias_limit, seed=self.seed)
                if data.kind == "binary":
                    from bias_probe.probe import small_groups
                    small_groups([it.group for it in data.items], 10)
            except BiasProbeError as e:
                raise AmpPruneError(f"--bias-check: {e}") from None
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            raise AmpPruneError(f"--eval-text file not found: {self.eval_text}")
        return self

    def default_out(self) -> str:
        """``<model name>-<criterion><percent>`` in the current directory."""
        name = Path(self.model.rstrip("/")).name.removesuffix(".gguf") or "model"
        if self.method == "cka":
            tag = f"{self.layer_criterion}-{self.layers}L" if self.layers else f"{self.layer_criterion}{round(self.ratio * 100)}"
            return f"{name}-{tag}"
        tag = self.criterion if self.method == "width" else "hybrid"
        return f"{name}-{tag}{round(self.ratio * 100)}"

    def to_dict(self) -> dict:
        return asdict(self)
