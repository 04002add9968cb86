"""Where a module's weights are while it runs: on a device, or offloaded behind accelerate hooks.

The block runner (:mod:`amp_prune.calib.blockwise`), the scorers, the refit and surgery all
move or load one block at a time through these; loading a model with its blocks on disk
(:mod:`amp_prune.io.offload`) builds on them. A disk-offloaded module holds meta tensors and an
accelerate ``AlignDevicesHook`` whose ``weights_map`` reads each weight from disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import has_offloaded_params, set_module_tensor_to_device
from torch import nn


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


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Temporarily move ``module`` (parameters and buffers) to ``device``, then move it back.

    Weights offloaded to disk (``--offload disk``) are loaded onto ``device`` once for the
    duration, and dropped again on exit (:func:`materialized`).
    """
    with materialized(module, device):
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"]
        if not tensors or tensors[0].device == device:
            yield module
            return
        home = tensors[0].device
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)


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


def offload_home(module: nn.Module) -> torch.device | None:
    """The execution device of ``module``'s offloaded weights, or ``None`` when nothing in it is offloaded."""
    return next((m._hf_hook.execution_device for m in module.modules() if has_offloaded_params(m)), None)
