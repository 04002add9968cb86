"""``bias-probe MODEL --dataset compas|adult|crime|bbq|crows_pairs|winobias|FILE.jsonl --attribute race ...``"""

from __future__ import annotations

import argparse
import logging
import sys

from bias_probe.datasets import ATTRIBUTES, BUILTIN
from bias_probe.decision import DECISIONS, FIT_SHARE
from bias_probe.errors import BiasProbeError
from bias_probe.metrics import MITIGATIONS
from bias_probe.probe import DEFAULT_DECISION, DEFAULT_MITIGATION
from bias_probe.scoring import CHAT_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bias-probe",
        description="Counterfactual fairness probe: swap a protected attribute, compare the answers, and report "
                    "group fairness before and after test-time mitigation.",
        epilog="Attributes: " + "; ".join(f"{d}: {', '.join(a)}" for d, a in ATTRIBUTES.items())
               + ". A FILE.jsonl has 'text' (with an {attribute} placeholder), 'label' and 'attribute' per line.")
    p.add_argument("model", metavar="MODEL", help="a local HF model directory (dense or pruned) or a hub id")
    p.add_argument("--dataset", required=True, help=f"{'|'.join(BUILTIN)} or FILE.jsonl")
    p.add_argument("--attribute", help="protected attribute (default: the dataset's first, e.g. race for compas)")
    p.add_argument("--data-dir", help="local copy of shared/data (for the built-in datasets)")
    p.add_argument("--limit", type=int, help="a seeded sample of N items (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mitigation", choices=MITIGATIONS, default=DEFAULT_MITIGATION,
                   help="mean probability or majority vote over the variants (default %(default)s)")
    p.add_argument("--decision", choices=DECISIONS, default=None,
                   help=f"how probabilities become answers: argmax; calibrated (batch calibration: each option's "
                        f"probability divided by its mean over all items and variants; no labels); threshold "
                        f"(positive when P(positive) >= --threshold, or a threshold fitted to the base rate of a "
                        f"seeded {FIT_SHARE:.0%}% of the items, which are then not reported on). Default: "
                        f"{DEFAULT_DECISION} for yes/no tasks, argmax for bbq and winobias")
    p.add_argument("--threshold", type=float, help="the P(positive) threshold of --decision threshold (default: fitted)")
    p.add_argument("--chat-template", choices=CHAT_MODES, default="auto",
                   help="ask in the user turn of the tokenizer's chat template and score each option as the start of "
                        "the reply (auto: when the tokenizer has one; default %(default)s)")
    p.add_argument("--min-group-size", type=int, default=10,
                   help="groups with fewer items are left out of the group metrics (default %(default)s)")
    p.add_argument("--out", help="report path (report.json; also report.items.jsonl and report.png)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        from bias_probe.datasets import load
        from bias_probe.probe import probe
        from bias_probe.report import check_outputs, format_report, write_outputs

        if args.out:
            check_outputs(args.out, args.overwrite)
        data = load(args.dataset, args.attribute, data_dir=args.data_dir, limit=args.limit, seed=args.seed)
        from bias_probe.probe import check_request
        check_request(data, decision=args.decision, threshold=args.threshold, mitigation=args.mitigation,
                      batch_size=args.batch_size, min_group_size=args.min_group_size, seed=args.seed)
        rep, records = probe(args.model, args.dataset, args.attribute, data_dir=args.data_dir, limit=args.limit,
                             seed=args.seed, mitigation=args.mitigation, decision=args.decision,
                             threshold=args.threshold, chat_template=args.chat_template, batch_size=args.batch_size,
                             min_group_size=args.min_group_size,
                             device=args.device, dtype=args.dtype, progress=not args.no_progress)
        print(format_report(rep))
        if args.out:
            paths = write_outputs(rep, records, args.out, overwrite=args.overwrite)
            print("written: " + ", ".join(str(p) for p in paths.values()))
        return 0
    except BiasProbeError as e:
        if args.debug:
            raise
        print(f"bias-probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bias-probe: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if args.debug:
            raise
        print(f"bias-probe: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
