"""Decoder blocks kept on disk through accelerate's big-model hooks (``--offload disk``).

The model is loaded with ``from_pretrained(device_map=..., offload_folder=...)``: the embeddings,
the final norm and the head go to the execution device, every decoder block to ``"disk"``. A
disk-offloaded block holds meta tensors and an accelerate ``AlignDevicesHook`` whose
``weights_map`` reads each weight from the checkpoint's own safetensors files (memory-mapped, no
copy; other formats are written once into the offload folder). A plain ``model(...)`` forward
works as it is: every hooked module loads its weights for its own forward and drops them after.

The block-by-block passes use :func:`amp_prune.placement.materialized` instead: it loads a whole block once, switches
its hooks' offloading off while every batch runs through it, and sends the weights back to meta
on exit. So host memory holds one dense block at a time, plus what is not a block. Surgery calls
:func:`amp_prune.placement.detach` on each block it changes, shrinks it, and :func:`keep_on_disk` writes the pruned
block to a spill folder that lives as long as the model (:func:`spill_dir`) and offloads it there
again; unchanged blocks keep pointing at the checkpoint. The pruned model is therefore offloaded
too, and ``save_pretrained`` reads its weights back one shard at a time.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import disk_offload, init_empty_weights
from accelerate.utils import convert_file_size_to_int, infer_auto_device_map
from torch import nn
from transformers import AutoModelForCausalLM

from amp_prune.arch import ArchSpec
from amp_prune.errors import AmpPruneError
from amp_prune.placement import is_offloaded

if TYPE_CHECKING:
    from amp_prune.io.load import LoadedModel

log = logging.getLogger(__name__)


def parse_max_memory(text: str) -> dict[str | int, int]:
    """``"0=70GiB,cpu=100GiB"`` -> ``{0: 75161927680, "cpu": 107374182400}`` (accelerate's ``max_memory``; a bare
    number is bytes)."""
    out: dict[str | int, int] = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        key = key.strip()
        try:
            if not sep or not (key == "cpu" or key.isdigit()):
                raise ValueError
            size = size.strip()
            out[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise AmpPruneError(f"--max-memory '{text}': write DEVICE=SIZE pairs separated by commas, DEVICE a GPU "
                                "index or cpu, e.g. cpu=20GiB or 0=70GiB,cpu=100GiB") from None
    return out


def disk_device_map(config, spec: ArchSpec, device: torch.device, dtype: torch.dtype | None = None,
                    max_memory: dict[str | int, int] | None = None) -> dict[str, str | int]:
    """``{module name: device}``: every decoder block on ``"disk"`` and the rest on ``device``.

    With ``max_memory``, accelerate's ``infer_auto_device_map`` fills the listed devices in order
    (GPUs, then CPU) with whole blocks and sends what does not fit to ``"disk"``. Built from a
    weightless (meta) instance of ``config``, so every module that owns a parameter or a buffer is
    covered, tied ones included.
    """
    with init_empty_weights(include_buffers=True):
        empty = AutoModelForCausalLM.from_config(config)
    if max_memory is not None:
        return infer_auto_device_map(empty, max_memory=max_memory, dtype=dtype,
                                     no_split_module_classes=list(empty._no_split_modules or []))
    here: str | int = device.index if device.type == "cuda" and device.index is not None else (
        0 if device.type == "cuda" else "cpu")
    prefix = spec.layers + "."
    out: dict[str, str | int] = {}
    names = [n for n, _ in empty.named_parameters(remove_duplicate=False)] + [n for n, _ in empty.named_buffers()]
    for name in names:
        if name.startswith(prefix):
            out[prefix + name[len(prefix):].split(".", 1)[0]] = "disk"
        else:
            out[name.rsplit(".", 1)[0]] = here
    return out


def spill_dir(model: nn.Module) -> Path:
    """A temporary folder that lives as long as ``model`` (its offloaded weights may point into it)."""
    if not hasattr(model, "_amp_prune_spill"):
        model._amp_prune_spill = tempfile.TemporaryDirectory(prefix="amp-prune-offload-")
    return Path(model._amp_prune_spill.name)


def keep_on_disk(model: nn.Module, block: nn.Module, device: torch.device) -> None:
    """After surgery: write ``block``'s pruned weights to ``model``'s spill folder and offload it there again.

    accelerate's ``disk_offload`` writes the state dict (one memory-mapped file per tensor) and
    attaches hooks that read it back, so host memory never holds more than the block in hand.
    """
    folder = spill_dir(model) / f"pruned-{uuid.uuid4().hex[:8]}"
    disk_offload(block, str(folder), execution_device=device)


def device_map_after_surgery(model: nn.Module, spec: ArchSpec) -> dict[str, str | int]:
    """``hf_device_map`` of the pruned model: ``"disk"`` for each block still offloaded (``save_pretrained``
    then reads the weights back one shard at a time), the device of each other block, and the
    loaded map's entries for what is not a block."""
    prefix = spec.layers + "."
    out = {k: v for k, v in getattr(model, "hf_device_map", {}).items()
           if not k.startswith(prefix) and k != spec.layers}
    for i, layer in enumerate(spec.get_layers(model)):
        out[f"{prefix}{i}"] = "disk" if is_offloaded(layer) else str(next(layer.parameters()).device)
    return out


MMAP_THRESHOLD = 128 << 10  # bytes; glibc's own starting value, kept fixed


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's ``M_MMAP_THRESHOLD`` (``mallopt``); ``False`` where the C library is not glibc.

    By default glibc raises the threshold each time a large chunk is freed (up to 32 MiB), so
    after the first freed block weight, block weights and activations are carved from the heap,
    which fragments and keeps the peak. With blocks read from disk and dropped after each pass,
    that cost 2.3 GB of peak RSS on SmolLM2 at 64 x 512 calibration, against 0.84 GB with the
    threshold pinned (``benchmarks/offload.py``; docs/benchmarks.md). Process-wide, so only
    ``--offload disk`` asks for it; ``MALLOC_MMAP_THRESHOLD_=131072`` does the same for any run.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, nbytes) == 1  # -3 = M_MMAP_THRESHOLD in glibc's malloc.h
    except (OSError, AttributeError):
        return False
    if ok:
        log.info("glibc mmap threshold fixed at %d bytes (freed blocks go back to the OS)", nbytes)
    return ok


def _fits_gpu(model: nn.Module, device: torch.device) -> bool:
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.8 * free:
        log.warning("model needs %.1f GiB but %s has %.1f GiB free: keeping it in CPU memory and moving one block "
                    "at a time (as --offload cpu)", need / 2**30, device, free / 2**30)
        return False
    return True


def load_placed(source: str, device: torch.device, dtype: torch.dtype, offload: str,
                max_memory: str | None = None) -> LoadedModel:
    """Load MODEL for pruning on ``device``, placed as ``offload`` asks (``none``, ``cpu`` or ``disk``).

    - ``disk``: the blocks stay in the checkpoint's files (what is not safetensors is written to the
      model's :func:`spill_dir`) and what is not a block goes onto ``device``; with ``max_memory``
      (:func:`parse_max_memory`) accelerate keeps as many blocks in memory as it allows;
    - ``cpu``: the model stays in CPU memory and each block visits ``device`` while it runs;
    - ``none``: on a GPU, the model moves there if it fits in 80% of free memory, else as ``cpu``.
    """
    from amp_prune.io.load import load_model

    if offload == "disk":
        fix_mmap_threshold()
        spill = tempfile.TemporaryDirectory(prefix="amp-prune-offload-")
        loaded = load_model(source, device=device, dtype=dtype, offload_folder=spill.name,
                            max_memory=parse_max_memory(max_memory) if max_memory else None)
        loaded.model._amp_prune_spill = spill  # removed with the model (or at exit), not before
        return loaded
    loaded = load_model(source, device=torch.device("cpu") if device.type == "cuda" else device, dtype=dtype)
    if device.type == "cuda" and offload == "none" and _fits_gpu(loaded.model, device):
        loaded.model.to(device)
    return loaded
