"""Where the depth search keeps the hidden states entering every block (the prefix cache).

A full cache holds one ``[B, T, H]`` tensor per batch for every remaining block plus the final
states, so its size is

    bytes = (L + 1) * tokens * H * itemsize          (tokens counted with pads: B * T per batch)

Llama-3-8B (L = 32, H = 4096, bf16) at 128 x 2048 calibration tokens: 33 * 262,144 * 4096 * 2 B
= 70.9 GB. The search caps its tokens (:func:`depth_batches`, 16 x 64 by default: 0.28 GB at 8B)
and places the cache as ``--depth-cache`` says:

- ``device``: on the execution device (fastest);
- ``cpu``: in host memory, each block's states copied to the device when a candidate uses them;
- ``disk``: one safetensors file per block in a temporary folder, read back when used;
- ``recompute``: only the final states are kept and every candidate reruns from the embeddings
  (``L(L-1)`` block-forwards per step instead of about ``L(L+1)/2``; angular and bi, which compare
  a block's input and output, are computed while the states stream past);
- ``auto``: ``device`` when the estimate is at most a quarter of the device's free memory (host
  RAM on CPU), else ``cpu`` when it is at most half the available host RAM, else ``disk``.

Block arguments (rotary tables, masks; one set per layer type) are shared objects, kept once per batch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amp_prune.calib.blockwise import BlockInputs
from amp_prune.calib.data import Batch, to_batches
from amp_prune.config import DEPTH_CACHES
from amp_prune.depth.similarity import angular_distance, block_influence
from amp_prune.errors import AmpPruneError

log = logging.getLogger(__name__)

PLACEMENTS = DEPTH_CACHES


def depth_batches(batches: list[Batch], samples: int | None, seq_len: int | None) -> list[Batch]:
    """The first ``samples`` sequences of ``batches``, each cut to its first ``seq_len`` tokens.

    The batches are right-padded and the model is causal, so a cut sequence's states are exactly
    the first ``seq_len`` states of the full one. ``None`` keeps that dimension whole.
    """
    rows = [(ids, mask) for b in batches for ids, mask in zip(b.input_ids, b.attention_mask)]
    longest = max((int(m.sum()) for _, m in rows), default=0)
    if (not samples or samples >= len(rows)) and (not seq_len or seq_len >= longest):
        return batches
    rows = rows[:samples] if samples else rows
    pads = [b.input_ids[b.attention_mask == 0] for b in batches]
    pad = next((int(p[0]) for p in pads if p.numel()), 0)
    chunks = [ids[: int(mask.sum())][:seq_len].tolist() for ids, mask in rows]
    return to_batches(chunks, batches[0].input_ids.shape[0], pad)


def tokens_of(batches: list[Batch]) -> int:
    """Token positions the cache stores per block, pads included: ``sum(B * T)``."""
    return sum(b.input_ids.numel() for b in batches)


def estimate_bytes(batches: list[Batch], n_layers: int, hidden: int, dtype: torch.dtype) -> int:
    """Size of a full prefix cache: ``(n_layers + 1) * tokens * hidden * itemsize``."""
    return (n_layers + 1) * tokens_of(batches) * hidden * torch.empty((), dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> tuple[int, int]:
    """(free memory of ``device``, available host RAM), in bytes."""
    try:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        host = 0
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], host
    return host, host


def choose_placement(requested: str, estimate: int, device: torch.device) -> str:
    """Resolve ``auto`` (see the module docstring); other values are returned as they are."""
    if requested not in PLACEMENTS:
        raise AmpPruneError(f"unknown --depth-cache '{requested}': choose one of {', '.join(PLACEMENTS)}")
    if requested != "auto":
        return requested
    dev_free, host = _free_bytes(device)
    if estimate <= dev_free / 4:
        return "device"
    return "cpu" if estimate <= host / 2 else "disk"


class StateCache:
    """``cache[i]`` = the states entering block ``i`` (``i = L``: after the last block), placed as asked.

    With ``changes=True`` the mean angular distance and block influence of each block's input
    ``cache[i]`` against the next recorded entry are computed as entries arrive (in block order).
    """

    def __init__(self, placement: str, device: torch.device, *, changes: bool = False) -> None:
        self.placement, self.device, self.track = placement, device, changes
        self._hidden: dict[int, list[torch.Tensor]] = {}
        self._meta: dict[int, list[tuple[list[dict], torch.Tensor]]] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="amp-prune-depth-") if placement == "disk" else None
        self.changes: dict[int, tuple[float, float]] = {}
        self._last: tuple[int, list[torch.Tensor]] | None = None
        self.final_key: int | None = None

    def resume(self) -> None:
        """Start a new run of entries (the next one does not follow the last one recorded)."""
        self._last = None

    def _file(self, i: int) -> Path:
        return Path(self._tmp.name) / f"block-{i}.safetensors"

    def __setitem__(self, i: int, states: list[BlockInputs]) -> None:
        hidden = [s.hidden for s in states]
        if self.track and self._last is not None:
            (j, prev) = self._last
            a = torch.cat([h[s.mask] for h, s in zip(prev, states)])
            b = torch.cat([s.hidden[s.mask] for s in states])
            self.changes[j] = (angular_distance(a, b).mean().item(), block_influence(a, b).mean().item())
        self._last = (i, hidden)
        self._meta[i] = [(s.layer_kwargs, s.mask) for s in states]
        if self.placement == "device" or i == self.final_key:
            self._hidden[i] = hidden
        elif self.placement == "cpu":
            self._hidden[i] = [h.to("cpu") for h in hidden]
        elif self.placement == "disk":
            save_file({str(n): h.contiguous().cpu() for n, h in enumerate(hidden)}, str(self._file(i)))

    def set_final(self, i: int, states: list[BlockInputs]) -> None:
        """Record the states after the last block (always kept, whatever the placement)."""
        self.final_key = i
        self[i] = states

    def has_states(self, i: int) -> bool:
        return i in self._hidden or (self.placement == "disk" and i in self._meta)

    def __getitem__(self, i: int) -> list[BlockInputs]:
        if not self.has_states(i):
            raise KeyError(f"no cached states for block {i} (placement {self.placement})")
        if i in self._hidden:
            hidden = [h.to(self.device) for h in self._hidden[i]]
        else:
            loaded = load_file(str(self._file(i)), device=str(self.device))
            hidden = [loaded[str(n)] for n in range(len(loaded))]
        return [BlockInputs(h, kw, m) for h, (kw, m) in zip(hidden, self._meta[i])]

    def __iter__(self):
        return iter(sorted(self._meta))

    def pop(self, i: int) -> None:
        """Forget block ``i`` (it was removed)."""
        self._meta.pop(i, None)
        self._hidden.pop(i, None)
        self.changes.pop(i, None)
        if self._tmp is not None:
            self._file(i).unlink(missing_ok=True)

    def stored_bytes(self) -> int:
        """Bytes of hidden states held now, in memory or on disk."""
        held = sum(h.numel() * h.element_size() for hs in self._hidden.values() for h in hs)
        if self._tmp is not None:
            held += sum(f.stat().st_size for f in Path(self._tmp.name).glob("*.safetensors"))
        return held

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
