"""Decoder blocks kept on disk through accelerate's big-model hooks (``--offload disk``).

The model is loaded with ``from_pretrained(device_map=..., offload_folder=...)``: the embeddings,
the final norm and the head go to the execution device, every decoder block to ``"disk"``. A
disk-offloaded block holds meta tensors and an accelerate ``AlignDevicesHook`` whose
``weights_map`` reads each weight from the checkpoint's own safetensors files (memory-mapped, no
copy; other formats are written once into the offload folder). A plain ``model(...)`` forward
works as it is: every hooked module loads its weights for its own forward and drops them after.

The block-by-block passes use :func:`materialized` instead: it loads a whole block once, switches
its hooks' offloading off while every batch runs through it, and sends the weights back to meta
on exit. So host memory holds one dense block at a time, plus what is not a block. Surgery calls
:func:`detach` on each kept block before shrinking it (the pruned block then lives in CPU memory,
as a normal module), and :func:`release` removes the remaining hooks, so the pruned model is a
plain in-memory model, and exports as one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from accelerate import init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import (convert_file_size_to_int, has_offloaded_params, infer_auto_device_map,
                              set_module_tensor_to_device)
from torch import nn
from transformers import AutoModelForCausalLM

from amp_prune.arch import ArchSpec
from amp_prune.errors import AmpPruneError

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


def is_offloaded(model: nn.Module) -> bool:
    """True when some submodule of ``model`` keeps its weights off-memory behind an accelerate hook."""
    return any(has_offloaded_params(m) for m in model.modules())


@contextlib.contextmanager
def materialized(module: nn.Module, device: torch.device | None = None) -> Iterator[nn.Module]:
    """Load every offloaded weight under ``module`` onto ``device`` (default: each hook's own), for the duration.

    Inside, the hooks' offloading is off, so the block's forwards over many batches and any
    weight read (a scorer's ``finish``, a refit) see real tensors loaded once. On exit the
    weights go back to meta (an in-place change made inside is lost: use :func:`detach` to keep one).
    A module with nothing offloaded passes through unchanged.
    """
    subs = [m for m in module.modules() if has_offloaded_params(m)]
    saved: list[tuple[nn.Module, torch.device]] = []
    try:
        for m in subs:
            hook = m._hf_hook
            saved.append((m, hook.execution_device))
            if device is not None:
                hook.execution_device = device
            hook.pre_forward(m)  # loads weights_map[name] onto the execution device
            hook.offload = False
        yield module
    finally:
        for m, home in saved:
            hook = m._hf_hook
            hook.offload = True
            hook.post_forward(m, None)  # back to meta
            hook.execution_device = home


def detach(module: nn.Module, device: torch.device | str = "cpu") -> None:
    """Load ``module``'s offloaded weights onto ``device`` for good and remove its accelerate hooks (before surgery)."""
    for m in list(module.modules()):
        if has_offloaded_params(m):
            hook = m._hf_hook
            for name, _ in list(m.named_parameters(recurse=False)):
                set_module_tensor_to_device(m, name, device, value=hook.weights_map[name])
            if hook.offload_buffers:
                for name, _ in list(m.named_buffers(recurse=False)):
                    set_module_tensor_to_device(m, name, device, value=hook.weights_map[name])
    remove_hook_from_module(module, recurse=True)


def release(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """After surgery: detach what is still offloaded, drop every hook and the device map, keep the model on ``device``."""
    detach(model, device)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    model.to(device)
    log.info("the pruned model is in %s memory; its blocks are no longer read from disk", device)


def _fits_gpu(model: nn.Module, device: torch.device) -> bool:
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.8 * free:
        log.warning("model needs %.1f GiB but %s has %.1f GiB free: keeping it in CPU memory and moving one block "
                    "at a time (as --offload cpu)", need / 2**30, device, free / 2**30)
        return False
    return True


def load_placed(source: str, device: torch.device, dtype: torch.dtype, offload: str,
                offload_folder: str | None = None, max_memory: str | None = None):
    """Load MODEL for pruning on ``device``, placed as ``offload`` asks (``none``, ``cpu`` or ``disk``).

    - ``disk``: the blocks stay in the checkpoint's files (``offload_folder`` takes what is not
      safetensors) and what is not a block goes onto ``device``; with ``max_memory``
      (:func:`parse_max_memory`) accelerate keeps as many blocks in memory as it allows;
    - ``cpu``: the model stays in CPU memory and each block visits ``device`` while it runs;
    - ``none``: on a GPU, the model moves there if it fits in 80% of free memory, else as ``cpu``.
    """
    from amp_prune.io.load import load_model

    if offload == "disk":
        if offload_folder is None:
            raise ValueError("--offload disk needs an offload folder")
        return load_model(source, device=device, dtype=dtype, offload_folder=offload_folder,
                          max_memory=parse_max_memory(max_memory) if max_memory else None)
    loaded = load_model(source, device=torch.device("cpu") if device.type == "cuda" else device, dtype=dtype)
    if device.type == "cuda" and offload == "none" and _fits_gpu(loaded.model, device):
        loaded.model.to(device)
    return loaded
