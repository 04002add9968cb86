"""Time and peak host memory of one prune with the model in memory, in CPU memory (``--offload cpu``) or on disk.

    python benchmarks/offload.py --ratio 0.3 --num-samples 64 --seq-len 512

Each placement runs the same ``prune(...)`` call the CLI makes (width, AMP, the default split and
refit, export with its reload check) in a fresh process, so each peak RSS (``ru_maxrss``) is its
own. ``baseline MB`` is the RSS of that process after its imports and before the load, so ``peak
above baseline`` is what the run itself held; ``planning peak`` is the same peak read when the plan
is made (load, dense perplexity, scoring and refit, before surgery and export). On this CPU-only machine ``none`` and ``cpu`` place
the model identically (its blocks are already where they run); they differ on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, rss_mb, save_json  # noqa: E402

PHASES = ["load_s", "calibration_data_s", "scoring_s", "search_s", "refit_s", "surgery_s", "export_s", "total_s"]


def one(args) -> dict:
    from amp_prune import PruneConfig, prune
    from amp_prune.io.files import peak_rss_mb

    base = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        res = prune(PruneConfig.from_flat(model=args.model, out=str(out), ratio=args.ratio, method=args.method,
                                          num_samples=args.num_samples, seq_len=args.seq_len, offload=args.offload,
                                          device=args.device, progress=False))
        plan = json.loads((out / "pruning_plan.json").read_text())
        digest = hashlib.sha256(json.dumps(plan["layers"], sort_keys=True).encode()).hexdigest()[:12]
    t = res.timings
    return {"offload": args.offload, **{k: round(t[k], 1) for k in PHASES if k in t}, "baseline MB": round(base),
            "planning peak above baseline MB": round(t["planning_peak_rss_mb"] - base),
            "peak RSS MB": round(peak_rss_mb()), "peak above baseline MB": round(peak_rss_mb() - base),
            "ppl before": round(res.summary["ppl_before"], 3), "ppl after": round(res.summary["ppl_after"], 3),
            "plan sha": digest, "export max abs diff": res.summary["export_max_abs_diff"]}


def forwards(args) -> list[dict]:
    """One pass over the same calibration batches: in memory, on disk through accelerate's own per-forward
    onloading (every hooked module reads its weights for every batch), and on disk block by block
    (each block read once per pass, :func:`amp_prune.io.offload.materialized`)."""
    import time

    import torch

    from amp_prune.calib.data import build_batches
    from amp_prune.eval.perplexity import final_hidden
    from amp_prune.io.load import load_model

    dev = torch.device(args.device)
    mem = load_model(args.model, device=dev)
    batches, _ = build_batches(mem.tokenizer, num_samples=args.num_samples, seq_len=args.seq_len, eval_samples=0)
    with tempfile.TemporaryDirectory() as spill:
        disk = load_model(args.model, device=dev, offload_folder=spill)
        rows = []
        with torch.no_grad():  # one untimed pass first: the first pass of a process pays for warm-up
            final_hidden(mem.model, mem.spec, batches, dev)
        for name, fn in [
            ("in memory, block by block", lambda: final_hidden(mem.model, mem.spec, batches, dev)),
            ("disk, accelerate per-forward onloading", lambda: [
                disk.model.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                for b in batches]),
            ("disk, block by block (materialized)", lambda: final_hidden(disk.model, disk.spec, batches, dev)),
        ]:
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            rows.append({"pass": name, "s": round(time.perf_counter() - t, 2)})
        print(f"\n{args.model}: one forward pass over {args.num_samples} x {args.seq_len} calibration tokens\n")
        print_table(rows, ["pass", "s"])
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="width", choices=["width", "cka"])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--placements", nargs="+", default=["none", "cpu", "disk"])
    ap.add_argument("--forwards", action="store_true", help="time one pass per placement instead of a prune")
    ap.add_argument("--offload", help="run one placement in this process and print its row as JSON (internal)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.offload:
        print(json.dumps(one(args)))
        return
    if args.forwards:
        return save_json(args.json, forwards(args))
    rows = []
    for placement in args.placements:
        cmd = [sys.executable, __file__, "--offload", placement, "--model", args.model, "--method", args.method,
               "--ratio", str(args.ratio), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
               "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"--offload {placement} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{args.model}, --method {args.method} --ratio {args.ratio}, calibration {args.num_samples} x "
          f"{args.seq_len}, --device {args.device}; a fresh process per placement\n")
    cols = ["offload", *[k for k in PHASES if any(k in r for r in rows)], "baseline MB",
            "planning peak above baseline MB", "peak above baseline MB", "ppl after", "plan sha"]
    print_table(rows, cols)
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
