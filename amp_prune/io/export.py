"""Save a pruned model as a plain HF checkpoint, atomically, and prove it reloads.

The output dir holds safetensors, config, tokenizer, ``pruning_plan.json``, ``run.json``
and a ``README.md`` model card. It is written to a temporary sibling dir, reloaded there
with plain ``AutoModelForCausalLM.from_pretrained`` (no ``trust_remote_code``), and the
reloaded model's stock forward is compared with the in-memory model's stock forward
(:func:`amp_prune.eval.agreement.stock_logit_diff`: each model's own class, not the block
runner, so a runner bug cannot make the two agree). Only then is it renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, MistralForCausalLM, PreTrainedModel

from amp_prune.arch import native_config
from amp_prune.calib.data import Batch
from amp_prune.errors import AmpPruneError
from amp_prune.eval.agreement import stock_logit_diff, tolerance
from amp_prune.io.faults import tensor_bytes, writing_to
from amp_prune.io.files import release_freed_memory, write_json
from amp_prune.placement import is_offloaded

log = logging.getLogger(__name__)

OFFLOADED_SHARD = "1GB"  # with --offload disk, the most host memory one shard of the export holds


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


def to_native(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself when stock transformers reloads its config, else an equivalent Mistral sharing its tensors.

    The choice of class is :func:`amp_prune.arch.native_config`'s.
    """
    mcfg = native_config(model.config)
    if mcfg is None:
        return model
    with init_empty_weights(include_buffers=False):
        native = MistralForCausalLM(mcfg)
    native.load_state_dict(model.state_dict(), strict=True, assign=True)
    native.tie_weights()
    native.to(next(model.parameters()).device).eval()
    log.info("LlamaConfig cannot express %d heads with hidden %d: exporting as MistralForCausalLM",
             model.config.num_attention_heads, model.config.hidden_size)
    return native


def _fix_permissions(root: Path) -> None:
    """Give every written file the umask's default mode (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in root.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _export_offloaded(model: PreTrainedModel, tokenizer, tmp: Path, check_batches: list[Batch],
                      device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Save a model whose blocks are on disk, reading them back one shard of ``OFFLOADED_SHARD`` at a time,
    and compare its logits with a reload that is disk-offloaded too; returns ``(max |diff|, class name)``."""
    from amp_prune.io.load import load_model

    mcfg = native_config(model.config)
    config = model.config
    try:  # a Mistral export differs in its config only (the tensors are named alike), so it is saved with that one
        model.config = mcfg if mcfg is not None else config
        with warnings.catch_warnings():  # transformers warns that a shard is loaded whole: the shard size bounds it
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(tmp, max_shard_size=OFFLOADED_SHARD)
    finally:
        model.config = config
    if mcfg is not None:  # save_pretrained names the class it saved from: name the one that reloads it
        mcfg.architectures = ["MistralForCausalLM"]
        mcfg.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with tempfile.TemporaryDirectory(prefix="amp-prune-offload-") as spill:
        reloaded = load_model(str(tmp), device=device, dtype=dtype, offload_folder=spill)
        diff = stock_logit_diff(model, reloaded.model, check_batches, device)
        name = type(reloaded.model).__name__
        del reloaded
    return diff, name


def export(model: PreTrainedModel, tokenizer, out: str | Path, *, check_batches: list[Batch], device: torch.device,
           files: dict[str, dict] | None = None, card: Callable[[float], str] | None = None,
           overwrite: bool = False, input_path: str | None = None,
           writers: list[Callable[[Path], None]] | None = None) -> ExportCheck:
    """Write ``model`` to ``out`` atomically after a reload-and-compare check.

    ``files`` maps extra JSON file names to contents; ``card(max_abs_diff)`` returns the
    ``README.md`` text; ``writers`` are called with the temporary dir to add other files
    (plots). Raises :class:`AmpPruneError` and leaves nothing behind if the reloaded logits
    differ beyond the dtype's tolerance, or if the disk fills up or the folder cannot be written
    (:func:`amp_prune.io.faults.writing_to`).
    """
    out = check_out_dir(out, overwrite=overwrite, input_path=input_path)
    dtype = next(model.parameters()).dtype
    with writing_to(out, tensor_bytes(model)):  # a full disk or no permission: one line, nothing left behind
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            if is_offloaded(model):
                diff, exported = _export_offloaded(model, tokenizer, tmp, check_batches, device, dtype)
            else:
                native = to_native(model)
                native.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                release_freed_memory()  # the serializer's buffers, before a second copy of the model loads
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
                reloaded.to(next(native.parameters()).device)
                diff = stock_logit_diff(model, reloaded, check_batches, device)
                del reloaded
                exported = type(native).__name__
            check = ExportCheck(max_abs_diff=diff, tolerance=tolerance(dtype), exported_class=exported)
            if not check.ok:
                raise AmpPruneError(f"reloaded checkpoint differs from the in-memory model (max |diff| {diff:.3g} > "
                                    f"{check.tolerance}); nothing was written. Please report this as a bug")
            for name, content in (files or {}).items():
                payload = dict(content)
                if name == "run.json":
                    payload["export_check"] = {"max_abs_diff": diff, "tolerance": check.tolerance,
                                               "exported_class": check.exported_class}
                write_json(tmp / name, payload)
            for write in writers or []:
                write(tmp)
            if card is not None:
                (tmp / "README.md").write_text(card(diff))
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
