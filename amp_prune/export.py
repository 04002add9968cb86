"""Save a pruned model as a plain HF checkpoint, atomically, and prove it reloads.

The output dir holds safetensors, config, tokenizer, ``pruning_plan.json``, ``run.json``
and a ``README.md`` model card. It is written to a temporary sibling dir, reloaded there
with plain ``AutoModelForCausalLM.from_pretrained`` (no ``trust_remote_code``), its logits
compared with the in-memory model, and only then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel

from amp_prune.arch import ArchSpec, get_spec
from amp_prune.calibration import Batch
from amp_prune.errors import AmpPruneError
from amp_prune.evaluation import max_logit_diff

log = logging.getLogger(__name__)


@dataclass
class ExportCheck:
    """Result of the reload-and-compare check."""

    max_abs_diff: float
    tolerance: float
    exported_class: str

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_out_dir(out: str | Path, *, overwrite: bool, input_path: str | None = None) -> Path:
    """Refuse an existing ``out`` (unless ``overwrite``) and any ``out`` that is or contains the input."""
    out = Path(out).expanduser().resolve()
    if input_path is not None:
        src = Path(input_path).expanduser().resolve()
        src_dir = src if src.is_dir() else src.parent
        if out == src_dir or src_dir.is_relative_to(out) or (src.is_dir() and out.is_relative_to(src)):
            raise AmpPruneError(f"output dir {out} would overwrite the input model {src}; choose another --out")
    if out.exists() and not overwrite:
        raise AmpPruneError(f"output dir {out} already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise AmpPruneError(f"output path {out} exists and is not a directory; choose another --out")
    return out


def _config_is_valid(config) -> bool:
    try:
        type(config)(**config.to_dict())
        return True
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return False


def to_native(model: PreTrainedModel) -> PreTrainedModel:
    """Return a model whose config reloads with stock transformers.

    ``LlamaConfig`` rejects ``hidden_size % num_attention_heads != 0``. Mistral computes the
    same function as Llama without biases or sliding window and has no such check, so such
    a model is rebuilt as ``MistralForCausalLM`` sharing the same tensors.
    """
    cfg = model.config
    if _config_is_valid(cfg):
        return model
    if cfg.model_type != "llama" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise AmpPruneError(f"the pruned {cfg.model_type} config is rejected by transformers "
                            f"({cfg.num_attention_heads} heads, hidden {cfg.hidden_size}); try --gqa-mode group")
    d = cfg.to_dict()
    for key in ("model_type", "architectures", "pretraining_tp", "attention_bias", "mlp_bias", "transformers_version",
                "layer_types"):
        d.pop(key, None)
    mcfg = MistralConfig(**{**d, "sliding_window": None})
    mcfg.architectures = ["MistralForCausalLM"]
    with init_empty_weights(include_buffers=False):
        native = MistralForCausalLM(mcfg)
    native.load_state_dict(model.state_dict(), strict=True, assign=True)
    native.tie_weights()
    native.to(next(model.parameters()).device).eval()
    log.info("LlamaConfig cannot express %d heads with hidden %d: exporting as MistralForCausalLM",
             cfg.num_attention_heads, cfg.hidden_size)
    return native


def _fix_permissions(root: Path) -> None:
    """Give every written file the umask's default mode (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in root.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2


def _eval_section(ev: dict | None) -> list[str]:
    """Markdown lines comparing the dense and pruned evaluation (empty without --eval)."""
    if not ev:
        return []
    from amp_prune.zeroshot import markdown_side_by_side
    return ["", "## Evaluation (dense vs pruned, same settings)", "", markdown_side_by_side(ev["dense"], ev["pruned"])]


def _bias_section(bias: dict | None) -> list[str]:
    if not bias:
        return []
    from amp_prune.fairness import markdown_bias_comparison
    return ["", "## Fairness check (bias_probe, dense vs pruned)", "", markdown_bias_comparison(bias)]


def write_model_card(path: Path, summary: dict) -> None:
    """A short README.md: what was removed, the numbers, and how to load it."""
    s = summary
    name = s.get("name", "path/to/this/dir")
    lines = [
        "---", "library_name: transformers", "tags: [pruned, amp-prune]", "---", "",
        f"# {name}", "",
        f"Structurally pruned from `{s['source']}` by amp-prune ({s['method']}).", "",
        "| | before | after |", "|---|---|---|",
        f"| parameters | {s['params_before']:,} | {s['params_after']:,} |",
        f"| attention heads / KV heads per block | {s['heads_before']} / {s['kv_before']} | {s['heads_after']} / {s['kv_after']} |",
        f"| decoder blocks | {s.get('layers_before', '-')} | {s.get('layers_after', '-')} |",
        f"| MLP channels per block | {s['channels_before']} | {s['channels_after']} |",
        f"| held-out perplexity | {s.get('ppl_before', float('nan')):.2f} | {s.get('ppl_after', float('nan')):.2f} |",
        "", (f"Target ratio {s['target_ratio']:.3f}, achieved " if s.get("target_ratio") is not None else "Achieved ")
        + f"{s['achieved_ratio']:.4f} of all parameters removed."
        + (f" Removed blocks (original indexing): {s['removed_layers']}." if s.get("removed_layers") else ""),
        f"Perplexity: {s.get('ppl_protocol', 'not measured')}.", "",
        f"The export was reloaded with plain `from_pretrained`; max |logit difference| = {s['export_max_abs_diff']:.2e}.",
        *_eval_section(s.get("eval")),
        *_bias_section(s.get("bias_check")),
        "", "## Load", "", "No custom code and no `trust_remote_code` are needed:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")', f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'pipe = pipeline("text-generation", model="{name}")', "```", "",
        "`pruning_plan.json` lists the removed heads, KV groups and channels per block (original indexing)",
        "and replays on the original model with `amp_prune.apply_plan`; `run.json` records the config,",
        "seed, package versions and timings.", "",
    ]
    path.write_text("\n".join(lines))


def export(model: PreTrainedModel, tokenizer, out: str | Path, *, check_batches: list[Batch], device: torch.device,
           files: dict[str, dict] | None = None, summary_for_card: dict | None = None, overwrite: bool = False,
           input_path: str | None = None, spec: ArchSpec | None = None,
           writers: list[Callable[[Path], None]] | None = None) -> ExportCheck:
    """Write ``model`` to ``out`` atomically after a reload-and-compare check.

    ``files`` maps extra JSON file names to contents; ``writers`` are called with the
    temporary dir to add other files (plots). Raises :class:`AmpPruneError` and
    leaves nothing behind if the reloaded logits differ beyond the dtype's tolerance.
    """
    out = check_out_dir(out, overwrite=overwrite, input_path=input_path)
    spec = spec or get_spec(model.config.model_type)
    native = to_native(model)
    dtype = next(model.parameters()).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        native.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        home = next(native.parameters()).device
        reloaded.to(home)
        diff = max_logit_diff(model, spec, reloaded, get_spec(reloaded.config.model_type), check_batches, device)
        del reloaded
        check = ExportCheck(max_abs_diff=diff, tolerance=_tolerance(dtype), exported_class=type(native).__name__)
        if not check.ok:
            raise AmpPruneError(f"reloaded checkpoint differs from the in-memory model (max |diff| {diff:.3g} > "
                                f"{check.tolerance}); nothing was written. Please report this as a bug")
        for name, content in (files or {}).items():
            payload = dict(content)
            if name == "run.json":
                payload["export_check"] = {"max_abs_diff": diff, "tolerance": check.tolerance,
                                           "exported_class": check.exported_class}
            (tmp / name).write_text(json.dumps(payload, indent=1, default=str))
        for write in writers or []:
            write(tmp)
        if summary_for_card is not None:
            write_model_card(tmp / "README.md", {**summary_for_card, "export_max_abs_diff": diff})
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        _fix_permissions(tmp)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return check
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
