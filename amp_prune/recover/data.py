"""Training data for LoRA recovery: instruction records or plain text -> padded batches.

Instruction data (Alpaca-style records with ``instruction``, optional ``input``, and
``output``) is formatted with the Alpaca prompt; the loss covers the response tokens only
(prompt labels are ``-100``). Any other text (``.txt``, ``.jsonl``/``.json`` with a text
field, or a ``datasets`` name) is cut into chunks for a plain causal-LM loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from amp_prune.calib.data import load_texts, make_chunks
from amp_prune.errors import AmpPruneError
from amp_prune.io.files import read_jsonl, read_text

IGNORE = -100
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class TrainBatch:
    """``input_ids``, ``attention_mask`` and ``labels`` (``-100`` = no loss), all ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _read_records(path: Path) -> list | None:
    """JSON/JSONL records, or ``None`` for other files."""
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return None
    if path.suffix == ".jsonl":
        return read_jsonl(path, "training data")
    try:
        data = json.loads(read_text(path, "training data"))
    except json.JSONDecodeError as e:
        raise AmpPruneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix it or pass a .txt file") from None
    return data if isinstance(data, list) else None


def is_instruction_data(records: list | None) -> bool:
    return bool(records) and all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records)


def _instruction_examples(records: list[dict], tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for r in records:
        template = PROMPT_INPUT if r.get("input") else PROMPT_NO_INPUT
        prompt = tokenizer(template.format(instruction=r["instruction"], input=r.get("input", "")),
                           add_special_tokens=True)["input_ids"]
        answer = tokenizer(str(r["output"]), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + answer)[:seq_len]
        labels = ([IGNORE] * len(prompt) + answer)[:seq_len]
        if any(t != IGNORE for t in labels):
            out.append((ids, labels))
    return out


def load_examples(source: str, tokenizer, *, seq_len: int, seed: int, field: str = "text") -> tuple[str, list]:
    """Return ``(kind, examples)`` with kind ``instruction`` or ``text``; each example is ``(ids, labels)``."""
    path = Path(source).expanduser()
    records = _read_records(path)
    if is_instruction_data(records):
        examples = _instruction_examples(records, tokenizer, seq_len)
        kind = "instruction"
    else:
        if records is not None and records and isinstance(records[0], dict) and "instruction" in records[0]:
            raise AmpPruneError(f"{source}: instruction records need both 'instruction' and 'output' in every record")
        chunks = make_chunks(load_texts(source, field=field, what="training data"), tokenizer, seq_len, seed)
        examples = [(c, list(c)) for c in chunks]
        kind = "text"
    if not examples:
        raise AmpPruneError(f"training data {source} gives no usable example; check the file and --seq-len")
    random.Random(seed).shuffle(examples)
    return kind, examples


def to_train_batches(examples: list, batch_size: int, pad_id: int) -> list[TrainBatch]:
    """Right-pad ``(ids, labels)`` examples into batches."""
    out = []
    for i in range(0, len(examples), batch_size):
        group = examples[i:i + batch_size]
        width = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, (x, y) in enumerate(group):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        out.append(TrainBatch(ids, mask, labels))
    return out
