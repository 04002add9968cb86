"""Calibration text -> padded token batches.

Sources: a local ``.txt`` (paragraphs split on blank lines, or lines), ``.jsonl`` or
``.json`` file (a ``text`` field, a list of strings, or Alpaca-style
``instruction/input/output`` records), or a ``datasets`` name. Each document is tokenized,
cut into non-overlapping chunks of at most ``seq_len`` tokens, and the chunks are shuffled
with ``seed``. The first ``num_samples`` chunks calibrate; the next ``eval_samples`` are the
held-out text for perplexity, so the two never overlap. Batches are right-padded and carry
an ``attention_mask``; pad positions are excluded from every statistic downstream.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from amp_prune.config import DEFAULT_SOURCE, MIN_CHUNK_TOKENS
from amp_prune.errors import AmpPruneError
from amp_prune.io.files import read_jsonl, read_text

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """``input_ids`` and ``attention_mask``, both ``[B, T]`` on CPU; mask 1 = real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def leading_rows(batches: list[Batch], tokens: int) -> list[Batch]:
    """The first sequences of ``batches`` (in order, same padding) that hold at least ``tokens`` real tokens."""
    out: list[Batch] = []
    seen = 0
    for b in batches:
        rows = []
        for r in range(b.input_ids.shape[0]):
            if seen >= tokens:
                break
            rows.append(r)
            seen += int(b.attention_mask[r].sum())
        if rows:
            out.append(Batch(b.input_ids[rows], b.attention_mask[rows]))
        if seen >= tokens:
            break
    return out


def builtin_path() -> Path:
    """The packaged default: 300 C4 documents (ODC-BY), see ``amp_prune/data/NOTICE``."""
    return Path(str(resources.files("amp_prune") / "data" / "c4_demo.jsonl"))


def _record_text(rec, field: str) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    if field in rec and isinstance(rec[field], str):
        return rec[field]
    if "instruction" in rec:  # Alpaca-style
        parts = [rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")]
        return "\n".join(p for p in parts if p)
    return None


def load_texts(source: str, *, field: str = "text", config: str | None = None, split: str = "train",
               what: str = "calibration") -> list[str]:
    """Return the non-empty documents of ``source``.

    A local file is decoded by :func:`amp_prune.io.files.read_text` (UTF-8, or UTF-16 with a BOM).
    Raises :class:`AmpPruneError` for a missing file, undecodable or binary bytes, an unreadable format
    or no text; ``what`` names the file's role in the message.
    """
    if source == DEFAULT_SOURCE:
        source = str(builtin_path())
    path = Path(source).expanduser()
    texts: list[str]
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise AmpPruneError(f"calibration file not found: {source}")
        if path.suffix == ".jsonl":
            texts = [_record_text(rec, field) or "" for rec in read_jsonl(path, what)]
        elif path.suffix == ".json":
            try:
                data = json.loads(read_text(path, what))
            except json.JSONDecodeError as e:
                raise AmpPruneError(f"{source} is not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict):
                data = data.get("data", data.get(field, []))
            if not isinstance(data, list):
                raise AmpPruneError(f"{source}: expected a JSON list of records or strings")
            texts = [_record_text(r, field) or "" for r in data]
        else:
            raw = read_text(path, what)
            blocks = [b for b in raw.split("\n\n") if b.strip()]
            texts = blocks if len(blocks) > 1 else raw.splitlines()
    else:
        texts = _load_dataset_texts(source, field=field, config=config, split=split)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise AmpPruneError(f"calibration source {source} has no text (looked for field '{field}')")
    return texts


def check_source(source: str, what: str = "calibration") -> None:
    """Pre-flight, before any model loads: a source that names a local file must exist and decode as text.

    Dataset names are checked when they are loaded.
    """
    if source == DEFAULT_SOURCE:
        return
    path = Path(source).expanduser()
    if (path.suffix in (".txt", ".jsonl", ".json") or path.exists()) and not path.is_file():
        raise AmpPruneError(f"{what} file not found: {source}")
    if path.is_file():
        read_text(path, what)


def _load_dataset_texts(name: str, *, field: str, config: str | None, split: str) -> list[str]:
    try:
        import datasets
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types for offline / missing / bad config
        raise AmpPruneError(
            f"cannot load calibration dataset '{name}' ({type(e).__name__}): pass a local .txt/.jsonl/.json "
            f"file, or check the name, --calib-config and --calib-split (offline machines need a local file)"
        ) from None
    if field not in ds.column_names:
        raise AmpPruneError(f"dataset '{name}' has no field '{field}'; columns are {ds.column_names}; use --calib-field")
    return list(ds[field])


def make_chunks(texts: list[str], tokenizer, seq_len: int, seed: int) -> list[list[int]]:
    """Tokenize documents, cut into ``<= seq_len`` chunks (``>= MIN_CHUNK_TOKENS``), shuffle."""
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = seq_len - 1 if add_bos else seq_len
    chunks: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start:start + body]
            if len(piece) >= MIN_CHUNK_TOKENS:
                chunks.append(([bos] if add_bos else []) + piece)
    random.Random(seed).shuffle(chunks)
    return chunks


def to_batches(chunks: list[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-pad chunks into ``Batch``es of ``batch_size`` (the last one may be smaller)."""
    out = []
    for i in range(0, len(chunks), batch_size):
        group = chunks[i:i + batch_size]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, c in enumerate(group):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        out.append(Batch(ids, mask))
    return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def build_batches(tokenizer, source: str = DEFAULT_SOURCE, *, num_samples: int = 64, seq_len: int = 512,
                  batch_size: int = 8, seed: int = 0, eval_samples: int = 0, field: str = "text",
                  config: str | None = None, split: str = "train",
                  eval_text: str | None = None) -> tuple[list[Batch], list[Batch]]:
    """Return ``(calibration_batches, heldout_batches)``.

    Held-out batches come from ``eval_text`` when given, else from chunks of ``source``
    that calibration did not use. Raises :class:`AmpPruneError` if the source is too short.
    """
    texts = load_texts(source, field=field, config=config, split=split)
    chunks = make_chunks(texts, tokenizer, seq_len, seed)
    need = num_samples + (eval_samples if eval_text is None else 0)
    if len(chunks) < need:
        raise AmpPruneError(
            f"calibration source {source} is too short: it gives {len(chunks)} chunks of "
            f"{MIN_CHUNK_TOKENS}-{seq_len} tokens but {need} are needed "
            f"(--num-samples {num_samples}" + (f" + --eval-samples {eval_samples}" if eval_text is None else "")
            + "); use a longer file or lower those numbers")
    pad = _pad_id(tokenizer)
    calib = to_batches(chunks[:num_samples], batch_size, pad)
    if eval_samples <= 0:
        return calib, []
    if eval_text is not None:
        held = make_chunks(load_texts(eval_text, field=field, what="--eval-text"), tokenizer, seq_len,
                           seed)[:eval_samples]
        if not held:
            raise AmpPruneError(f"--eval-text {eval_text} gives no chunk of at least {MIN_CHUNK_TOKENS} tokens")
    else:
        held = chunks[num_samples:num_samples + eval_samples]
    return calib, to_batches(held, batch_size, pad)
