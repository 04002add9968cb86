"""Run a decoder block by block (DESIGN habit 4).

The inputs of block 0 are captured once per batch; then every batch is pushed through
one block at a time. Only the block being run needs to sit on the execution device, so
peak accelerator memory is about one block plus the cached activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.io.offload import materialized


# what the model hands a block for its KV cache; the block runner has none, so it passes none of them
# (passing cache=None beside past_key_values=None makes transformers 5 warn that both are set)
_CACHE_KWARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past", "use_cache"})


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block, ``[B, T, H]``, plus the layer kwargs and the token mask."""

    hidden: torch.Tensor
    kwargs: dict
    mask: torch.Tensor  # [B, T] bool, True = real token


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Temporarily move ``module`` (parameters and buffers) to ``device``, then move it back.

    Weights offloaded to disk (``--offload disk``) are loaded onto ``device`` once for the
    duration, and dropped again on exit (:func:`amp_prune.io.offload.materialized`).
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


def _outside_blocks(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    mods = [spec.submodule(model, spec.embed), spec.submodule(model, spec.final_norm)]
    with contextlib.suppress(AttributeError):
        mods.append(spec.submodule(model, spec.rotary))
    return mods


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device, *,
                   progress: bool = False, desc: str = "calibration: embedding batches") -> list[BlockInputs]:
    """Run the embeddings of every batch and capture what enters block 0."""
    layers = spec.get_layers(model)
    captured: list[BlockInputs] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _CACHE_KWARGS}
        captured.append(BlockInputs(hidden=hidden, kwargs=kw, mask=torch.empty(0)))
        raise _StopForward

    stack = contextlib.ExitStack()
    with stack:
        for m in _outside_blocks(model, spec):
            stack.enter_context(on_device(m, device))
        handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        stack.callback(handle.remove)
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            try:
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
            captured[-1].mask = b.attention_mask.to(device).bool()
    return captured


@torch.no_grad()
def run_blocks(model: nn.Module, spec: ArchSpec, inputs: list[BlockInputs], device: torch.device, *,
               layer_context: Callable[[int, nn.Module, "MaskRef"], contextlib.AbstractContextManager] | None = None,
               skip: set[int] | None = None, start: int = 0, progress: bool = True,
               desc: str = "blocks", record: dict[int, list[BlockInputs]] | None = None) -> list[BlockInputs]:
    """Push ``inputs`` through blocks ``start..L-1`` (minus ``skip``), one block at a time.

    ``layer_context(i, layer, mask_ref)`` may return a context manager (typically installing
    hooks) that is active while block ``i`` runs; ``mask_ref.mask`` holds the current batch's
    token mask ``[B, T]``. Returns new ``BlockInputs`` holding the last block's outputs.
    If ``record`` is given, ``record[i]`` receives the states entering block ``i`` (a prefix cache).
    """
    layers = spec.get_layers(model)
    states = [BlockInputs(x.hidden, x.kwargs, x.mask) for x in inputs]
    ref = MaskRef()
    idx = [i for i in range(start, len(layers)) if not skip or i not in skip]
    for i in tqdm(idx, desc=desc, disable=not progress, leave=False):
        layer = layers[i]
        if record is not None:
            record[i] = [BlockInputs(s.hidden, s.kwargs, s.mask) for s in states]
        with on_device(layer, device):
            ctx = layer_context(i, layer, ref) if layer_context else contextlib.nullcontext()
            with ctx:
                for s in states:
                    ref.mask = s.mask
                    out = layer(s.hidden, **s.kwargs)
                    s.hidden = out[0] if isinstance(out, tuple) else out
    return states


class MaskRef:
    """Mutable holder of the current batch's token mask, read by hooks."""

    mask: torch.Tensor | None = None


@torch.no_grad()
def final_logits(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Apply the final norm and the lm_head to ``hidden`` ``[B, T, H]`` -> logits ``[B, T, V]``."""
    norm = spec.submodule(model, spec.final_norm)
    head = spec.submodule(model, spec.lm_head)
    with on_device(norm, device), on_device(head, device):
        return head(norm(hidden)).float()
