"""Run a decoder block by block (DESIGN habit 4).

What enters every block is captured once per batch: the hidden states entering block 0, and
the keyword arguments the model's own forward hands each block ``i`` (its rotary tables and
attention mask, which differ by layer type in Gemma 2/3, Cohere 2 and EXAONE 4: a sliding
layer gets the sliding mask and its own RoPE base). The capture runs the model's stock forward
with every block passed through unchanged, so it is the model's code, not ours, that decides
what each block gets. Then every batch is pushed through one block at a time, block ``i`` with
its own arguments. Only the block being run needs to sit on the execution device, so peak
accelerator memory is about one block plus the cached activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amp_prune.arch import ArchSpec
from amp_prune.calib.data import Batch
from amp_prune.placement import on_device

# what the model hands a block for its KV cache; the block runner has none, so it passes none of them
# (passing cache=None beside past_key_values=None makes transformers 5 warn that both are set)
_CACHE_KWARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past", "use_cache"})

__all__ = ["BlockInputs", "MaskRef", "block_forward", "capture_inputs", "final_logits", "kl_sum", "nll_sum",
           "on_device", "run_blocks"]

LOGIT_CHUNK = 2 ** 25  # logits formed at once by nll_sum / kl_sum: 128 MB in fp32 (128 positions of a 262k vocabulary)


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block ``[B, T, H]``, every block's keyword arguments, and the token mask.

    ``layer_kwargs[i]`` is what the model's forward passes block ``i`` (current indexing) besides
    the hidden states; blocks of one layer type share the same tensors.
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    mask: torch.Tensor  # [B, T] bool, True = real token

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        return BlockInputs(hidden, self.layer_kwargs, self.mask)


def block_forward(layer: nn.Module, i: int, s: BlockInputs) -> torch.Tensor:
    """Block ``i``'s output ``[B, T, H]`` for the states ``s`` entering it, with block ``i``'s own arguments."""
    out = layer(s.hidden, **s.layer_kwargs[i])
    return out[0] if isinstance(out, tuple) else out


def _outside_blocks(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    mods = [spec.submodule(model, spec.embed), spec.submodule(model, spec.final_norm)]
    with contextlib.suppress(AttributeError):
        mods.append(spec.submodule(model, spec.rotary))
    return mods


@contextlib.contextmanager
def _passed_through(layers: nn.ModuleList) -> Iterator[None]:
    """Every block returns its input hidden states unchanged (its forward hooks still run), for the duration.

    An instance ``forward`` (accelerate's offload wrapper) is put back on exit; no weight is loaded.
    """
    saved = [vars(layer).get("forward") for layer in layers]

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    try:
        for layer in layers:
            layer.forward = passthrough
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device, *,
                   progress: bool = False, desc: str = "calibration: embedding batches") -> list[BlockInputs]:
    """Run the model's forward on every batch with the blocks passed through, and capture what enters each block.

    The forward stops at the final norm (the lm_head never runs).
    """
    layers = spec.get_layers(model)
    captured: list[BlockInputs] = []
    seen: list[dict] = []
    first: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        if not seen:
            first.append(args[0] if args else kwargs["hidden_states"])
        seen.append({k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _CACHE_KWARGS})

    def stop(_mod, _args):
        raise _StopForward

    stack = contextlib.ExitStack()
    with stack:
        for m in _outside_blocks(model, spec):
            stack.enter_context(on_device(m, device))
        stack.enter_context(_passed_through(layers))
        for layer in layers:
            stack.callback(layer.register_forward_pre_hook(hook, with_kwargs=True).remove)
        stack.callback(spec.submodule(model, spec.final_norm).register_forward_pre_hook(stop).remove)
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            seen.clear()
            first.clear()
            try:
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
            if len(seen) != len(layers):
                raise RuntimeError(f"{type(model).__name__}'s forward called {len(seen)} of its {len(layers)} blocks")
            captured.append(BlockInputs(first[0], list(seen), b.attention_mask.to(device).bool()))
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
    A skipped block leaves every other block's arguments as they are (each keeps its own layer type's).
    """
    layers = spec.get_layers(model)
    states = [x.with_hidden(x.hidden) for x in inputs]
    ref = MaskRef()
    idx = [i for i in range(start, len(layers)) if not skip or i not in skip]
    for i in tqdm(idx, desc=desc, disable=not progress, leave=False):
        layer = layers[i]
        if record is not None:
            record[i] = [s.with_hidden(s.hidden) for s in states]
        with on_device(layer, device):
            ctx = layer_context(i, layer, ref) if layer_context else contextlib.nullcontext()
            with ctx:
                for s in states:
                    ref.mask = s.mask
                    s.hidden = block_forward(layer, i, s)
    return states


class MaskRef:
    """Mutable holder of the current batch's token mask, read by hooks."""

    mask: torch.Tensor | None = None


@torch.no_grad()
def final_logits(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits ``[B, T, V]`` (fp32) of ``hidden`` ``[B, T, H]`` leaving the last block, as the model's head forms them.

    ``head(norm(hidden))``, then the family's output transform (:meth:`ArchSpec.logit_transform`:
    Gemma 2's ``cap * tanh(z / cap)``, Cohere's scale, Granite's divisor).
    """
    norm = spec.submodule(model, spec.final_norm)
    head = spec.submodule(model, spec.lm_head)
    with on_device(norm, device), on_device(head, device):
        return spec.logit_transform(model.config, head(norm(hidden.to(device))).float())


def _chunk_rows(model: nn.Module, spec: ArchSpec) -> int:
    """Positions per chunk so that one chunk's logits ``[n, V]`` hold at most :data:`LOGIT_CHUNK` elements."""
    return max(1, LOGIT_CHUNK // spec.submodule(model, spec.lm_head).weight.shape[0])


@torch.no_grad()
def nll_sum(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor, targets: torch.Tensor,
            device: torch.device) -> float:
    """``sum_t -log p(targets_t | hidden_t)`` over rows of ``hidden`` ``[N, H]`` (last-block states), in fp64.

    Logits are formed a chunk of positions at a time (:data:`LOGIT_CHUNK`): a 262k vocabulary never
    holds more than 128 positions' logits.
    """
    step, total = _chunk_rows(model, spec), 0.0
    for s in range(0, hidden.shape[0], step):
        logits = final_logits(model, spec, hidden[s:s + step], device)
        total += F.cross_entropy(logits, targets[s:s + step].to(logits.device), reduction="sum").double().item()
    return total


@torch.no_grad()
def kl_sum(model: nn.Module, spec: ArchSpec, ref: torch.Tensor, hidden: torch.Tensor, device: torch.device) -> float:
    """``sum_t KL(p_ref,t || p_t)`` of the next-token distributions of rows ``ref`` and ``hidden`` ``[N, H]``, in fp64.

    Both come from one model's head (``ref``: the dense model's last-block states); chunked like :func:`nll_sum`.
    """
    step, total = _chunk_rows(model, spec), 0.0
    for s in range(0, hidden.shape[0], step):
        lp = F.log_softmax(final_logits(model, spec, ref[s:s + step], device), -1)
        lq = F.log_softmax(final_logits(model, spec, hidden[s:s + step], device), -1)
        total += F.kl_div(lq, lp, log_target=True, reduction="sum").double().item()
    return total
