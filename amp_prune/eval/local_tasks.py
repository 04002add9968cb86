"""lm-eval tasks built from local copies of the benchmark data (``--data-dir``), for offline machines.

Each local task is lm-eval's own task config (read from the installed lm-eval's YAML, so the
prompt, the choices, the target delimiter and the metrics are the stock ones) with only the
data source replaced: the local files are converted into the records of the Hugging Face
dataset that the stock task downloads, and handed to lm-eval through ``custom_dataset``.
``tests/test_local_tasks.py`` checks that the requests equal those the stock config builds.

The data dir layout is the one of ``shared/data`` (see its ``SOURCES.md``)::

    piqa/valid.jsonl + piqa/valid-labels.lst           PIQA validation
    arc/ARC-Easy-Test.hf.json                          ARC-Easy test (HF records)
    arc/ARC-Challenge-Test.jsonl                       ARC-Challenge test (original ARC format)
    hellaswag/hellaswag_val_full.txt.bz2               HellaSwag validation (klosax text format)
    winogrande/dev.jsonl                               WinoGrande winogrande_xl validation
    boolq/dev.jsonl                                    BoolQ dev
    openbookqa/test.jsonl                              OpenBookQA main test

HellaSwag is the one approximation: the local file holds the already preprocessed context
``activity_label: ctx_a ctx_b`` and endings, without the ``ctx_a``/``ctx_b`` split. lm-eval
capitalizes the first letter of ``ctx_b`` (and lower-cases the rest of it); the local task
cannot, so a query such as "...on a roof. he" stays lower-case where lm-eval has "He".
Tag stripping and space handling also differ slightly on WikiHow items. Scores are close to,
not identical with, stock lm-eval; everything else is identical.
"""

from __future__ import annotations

import bz2
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from amp_prune.errors import AmpPruneError
from amp_prune.io.files import read_jsonl

FIVE = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")  # the usual 5-task average
SEVEN = FIVE + ("boolq", "openbookqa")


@dataclass(frozen=True)
class LocalTask:
    name: str
    stock_yaml: str  # relative to lm_eval/tasks
    split: str  # the split the stock task evaluates
    files: tuple[str, ...]  # relative to the data dir
    load: Callable[[Path], list[dict]]  # data dir -> records in the HF schema of the stock task


def _labels(path: Path, n: int) -> list[str]:
    labels = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if len(labels) != n:
        raise AmpPruneError(f"{path} has {len(labels)} labels for {n} items; the files do not belong together")
    return labels


def _piqa(d: Path) -> list[dict]:  # baber/piqa: goal, sol1, sol2, label
    docs = read_jsonl(d / "piqa/valid.jsonl")
    labels = _labels(d / "piqa/valid-labels.lst", len(docs))
    return [{"goal": x["goal"], "sol1": x["sol1"], "sol2": x["sol2"], "label": int(y)} for x, y in zip(docs, labels)]


def _arc_choices(choices: list[dict]) -> dict:
    return {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}


def _arc_easy(d: Path) -> list[dict]:  # already the allenai/ai2_arc records
    try:
        docs = json.loads((d / "arc/ARC-Easy-Test.hf.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AmpPruneError(f"{d / 'arc/ARC-Easy-Test.hf.json'}: not valid JSON ({e.msg})") from None
    return [{"id": x["id"], "question": x["question"], "choices": {"text": list(x["choices"]["text"]),
             "label": list(x["choices"]["label"])}, "answerKey": x["answerKey"]} for x in docs]


def _arc_challenge(d: Path) -> list[dict]:  # original ARC jsonl -> allenai/ai2_arc records
    return [{"id": x["id"], "question": x["question"]["stem"], "choices": _arc_choices(x["question"]["choices"]),
             "answerKey": x["answerKey"]} for x in read_jsonl(d / "arc/ARC-Challenge-Test.jsonl")]


def _hellaswag(d: Path) -> list[dict]:
    """klosax format: 6 lines per item (context, gold, 4 endings) -> the documents after lm-eval's process_docs."""
    path = d / "hellaswag/hellaswag_val_full.txt.bz2"
    try:
        lines = bz2.decompress(path.read_bytes()).decode("utf-8").splitlines()
    except OSError as e:
        raise AmpPruneError(f"{path}: cannot decompress ({e}); the file is damaged, copy it again") from None
    if len(lines) % 6:
        raise AmpPruneError(f"{path}: {len(lines)} lines is not a multiple of 6; the file is damaged")
    out = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        out.append({"query": lines[i].strip(), "choices": [e.strip() for e in lines[i + 2:i + 6]],
                    "label": gold, "gold": int(gold)})
    return out


def _winogrande(d: Path) -> list[dict]:  # allenai/winogrande winogrande_xl: sentence, option1, option2, answer
    return [{"sentence": x["sentence"], "option1": x["option1"], "option2": x["option2"], "answer": str(x["answer"])}
            for x in read_jsonl(d / "winogrande/dev.jsonl")]


def _boolq(d: Path) -> list[dict]:  # aps/super_glue boolq: question, passage, idx, label
    return [{"question": x["question"], "passage": x["passage"], "idx": i, "label": int(bool(x["answer"]))}
            for i, x in enumerate(read_jsonl(d / "boolq/dev.jsonl"))]


def _openbookqa(d: Path) -> list[dict]:  # allenai/openbookqa main: id, question_stem, choices, answerKey
    return [{"id": x["id"], "question_stem": x["question"]["stem"], "choices": _arc_choices(x["question"]["choices"]),
             "answerKey": x["answerKey"]} for x in read_jsonl(d / "openbookqa/test.jsonl")]


TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("piqa", "piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", ("hellaswag/hellaswag_val_full.txt.bz2",),
              _hellaswag),
    LocalTask("winogrande", "winogrande/default.yaml", "validation", ("winogrande/dev.jsonl",), _winogrande),
    LocalTask("arc_easy", "arc/arc_easy.yaml", "test", ("arc/ARC-Easy-Test.hf.json",), _arc_easy),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test", ("arc/ARC-Challenge-Test.jsonl",), _arc_challenge),
    LocalTask("boolq", "super_glue/boolq/default.yaml", "validation", ("boolq/dev.jsonl",), _boolq),
    LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "test", ("openbookqa/test.jsonl",), _openbookqa),
)}


def get_local_task(name: str) -> LocalTask:
    if name not in TASKS:
        raise AmpPruneError(f"unknown task '{name}' for --data-dir: available are {', '.join(TASKS)}")
    return TASKS[name]


def check_files(name: str, data_dir: str | Path) -> Path:
    """The data dir, after checking that every file of ``name`` is there."""
    d = Path(data_dir)
    if not d.is_dir():
        raise AmpPruneError(f"--data-dir {d} is not a directory; point it at a copy of shared/data")
    for rel in get_local_task(name).files:
        if not (d / rel).is_file():
            raise AmpPruneError(f"missing data file for task '{name}': expected {d / rel} (see shared/data/SOURCES.md)")
    return d


def load_records(name: str, data_dir: str | Path) -> list[dict]:
    """The task's evaluation split as HF-schema records (HellaSwag: already processed documents)."""
    return get_local_task(name).load(check_files(name, data_dir))


def stock_config(name: str) -> dict:
    """lm-eval's own config of ``name`` (includes merged, ``!function`` entries resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / get_local_task(name).stock_yaml, resolve_func=True)


def _dataset(records: list[dict], split: str, **_metadata):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def config_with_records(name: str, records: list[dict], *, processed: bool = False) -> dict:
    """The stock config of ``name`` reading ``records`` instead of downloading its dataset.

    Only the data source changes (and the train split, which zero-shot never reads, is dropped).
    ``processed`` says the records are already lm-eval documents, so ``process_docs`` is skipped
    (the local HellaSwag file is preprocessed).
    """
    task = get_local_task(name)
    cfg = stock_config(name)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(dataset_path=None, dataset_name=None, dataset_kwargs=None, training_split=None,
               custom_dataset=partial(_dataset, records, task.split))
    for split in ("validation_split", "test_split"):
        if cfg.get(split) not in (None, task.split):
            cfg[split] = None
    if processed:
        cfg["process_docs"] = None
    return cfg


def build_local_task(name: str, data_dir: str | Path):
    """A ready lm-eval ``ConfigurableTask`` for ``name`` reading the local files under ``data_dir``."""
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=config_with_records(name, load_records(name, data_dir),
                                                       processed=name == "hellaswag"))
