"""Perplexity, computed block by block: held-out calibration chunks and the WikiText-2 protocol.

``ppl = exp( sum_t -log p(x_{t+1} | x_{<=t}) / N )`` over pairs of consecutive real tokens
(pad positions never count), accumulated in fp64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from amp_prune.arch import ArchSpec
from amp_prune.calib.blockwise import capture_inputs, nll_sum, run_blocks
from amp_prune.calib.data import Batch
from amp_prune.errors import AmpPruneError

WIKITEXT_ROWS = "wikitext2/wikitext-2-raw-v1.test.rows.json"
DEFAULT_PPL_SEQ_LEN = 2048


@torch.no_grad()
def final_hidden(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device, *,
                 progress: bool = False, desc: str = "forward") -> list[torch.Tensor]:
    """Hidden states ``[B, T, H]`` leaving the last block of every batch (before the final norm)."""
    states = run_blocks(model, spec, capture_inputs(model, spec, batches, device), device, progress=progress, desc=desc)
    return [s.hidden for s in states]


@torch.no_grad()
def perplexity(model: nn.Module, spec: ArchSpec, batches: list[Batch], device: torch.device, *,
               progress: bool = False, desc: str = "perplexity") -> float:
    """Token-level perplexity of ``model`` on ``batches``; ``nan`` when there is nothing to score."""
    nll, count = 0.0, 0
    for hidden, b in zip(final_hidden(model, spec, batches, device, progress=progress, desc=desc), batches):
        for r in range(hidden.shape[0]):  # logits a row at a time, in chunks of positions (nll_sum)
            keep = (b.attention_mask[r, 1:] & b.attention_mask[r, :-1]).bool()
            if keep.any():
                nll += nll_sum(model, spec, hidden[r, :-1][keep.to(hidden.device)], b.input_ids[r, 1:][keep], device)
                count += int(keep.sum())
    return math.exp(nll / count) if count else float("nan")


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token first by default (Gemma's does; SmolLM2's and Llama 2's GGUF do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def text_windows(tokenizer, text: str, seq_len: int, *, max_windows: int | None = None,
                 batch_size: int = 8) -> list[Batch]:
    """Tokenize ``text`` once and cut it into non-overlapping ``seq_len`` windows (no padding).

    This is the perplexity protocol of GPTQ, Wanda, SliceGPT and LLM-Pruner when ``text`` is
    the WikiText-2 test rows joined with ``"\\n\\n"``. When the tokenizer adds a BOS token by
    default (:func:`adds_bos`), every window is that BOS followed by ``seq_len - 1`` text tokens:
    such a model was trained to see it first (Gemma 3 270M: 34.1 with it, 170.8 without).
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = adds_bos(tokenizer)
    width = seq_len - 1 if bos else seq_len
    n = ids.numel() // width
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * width].view(n, width)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return [Batch(windows[i:i + batch_size], torch.ones_like(windows[i:i + batch_size]))
            for i in range(0, n, batch_size)]


def wikitext2_text(data_dir: str | None) -> str:
    """The WikiText-2 raw test rows joined with ``"\\n\\n"`` (local copy, or the HF dataset)."""
    if data_dir is not None:
        path = Path(data_dir) / WIKITEXT_ROWS
        if not path.is_file():
            raise AmpPruneError(f"missing data file for wikitext2: expected {path} (see shared/data/SOURCES.md)")
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        import datasets
        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as e:  # noqa: BLE001
            raise AmpPruneError(f"could not load wikitext-2-raw-v1 ({type(e).__name__}); offline, pass --data-dir DIR "
                                f"with {WIKITEXT_ROWS}") from None
    return "\n\n".join(rows)


def model_max_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def wikitext2_perplexity(model, tokenizer, spec, device: torch.device, *, data_dir: str | None,
                         seq_len: int | None = None, batch_size: int = 4, max_windows: int | None = None,
                         progress: bool = True) -> dict:
    """Token-level perplexity over non-overlapping ``seq_len`` windows of the joined test set."""
    limit = model_max_length(model)
    if seq_len is None:
        seq_len = min(DEFAULT_PPL_SEQ_LEN, limit or DEFAULT_PPL_SEQ_LEN)
    elif limit is not None and seq_len > limit:
        raise AmpPruneError(f"--seq-len {seq_len} is longer than the model's maximum {limit}; use --seq-len {limit}")
    if seq_len < 2:
        raise AmpPruneError(f"--seq-len must be at least 2 (got {seq_len})")
    windows = text_windows(tokenizer, wikitext2_text(data_dir), seq_len, max_windows=max_windows,
                           batch_size=batch_size)
    n = sum(b.input_ids.shape[0] for b in windows)
    if n == 0:
        raise AmpPruneError(f"WikiText-2 is shorter than one window of {seq_len} tokens")
    ppl = perplexity(model, spec, windows, device, progress=progress, desc="wikitext2 perplexity")
    bos = (f"each a BOS (the tokenizer adds one by default) and {seq_len - 1} text tokens" if adds_bos(tokenizer)
           else "no BOS")
    return {"ppl": ppl, "seq_len": seq_len, "windows": n, "bos": adds_bos(tokenizer),
            "protocol": f"WikiText-2 raw test rows joined with '\\n\\n', {n} non-overlapping windows of {seq_len} "
                        f"tokens, {bos}, loss on all but the first token of each window (GPTQ/Wanda/SliceGPT/"
                        f"LLM-Pruner protocol)" + (f"; first {max_windows} windows only" if max_windows else "")}
