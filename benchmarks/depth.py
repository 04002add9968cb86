"""Depth-pruning benchmarks on SmolLM2 (CPU by default).

    python benchmarks/depth.py speed    # time of one removal step vs number of layers, with/without prefix cache
    python benchmarks/depth.py search   # the whole --blocks iterative CKA search: exact against bounded rescoring
                                        # and token caps, on the CLI's calibration (64 x 512) cut as --depth-* cut it
    python benchmarks/depth.py robust   # the search's token budget: each SEQUENCESxTOKENS[:token][:bf16] run on
                                        # --slices disjoint calibration samples; time and the chosen blocks' ppl
    python benchmarks/depth.py memory   # peak RSS of the prefix cache against tokens, blocks and --depth-cache
    python benchmarks/depth.py quality  # WikiText-2 perplexity of each depth criterion (with and without the
                                        # stand-in), hybrid and AMP width (with and without the refit) at the
                                        # parameter budget of --blocks dropped blocks

The speed mode truncates SmolLM2 to its first L blocks, so the per-block cost is constant.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, print_table, rss_mb, save_json, wikitext_text  # noqa: E402

from amp_prune.calib.data import build_batches, to_batches  # noqa: E402
from amp_prune.depth.cache import depth_batches, estimate_bytes, tokens_of  # noqa: E402
from amp_prune.depth.hybrid import plan_hybrid  # noqa: E402
from amp_prune.depth.search import DepthSearch, angle, plan_depth, random_blocks  # noqa: E402
from amp_prune.eval.perplexity import perplexity, text_windows  # noqa: E402
from amp_prune.plan import step_to_dict  # noqa: E402
from amp_prune.io.load import load_model, resolve_device  # noqa: E402
from amp_prune.refit import compute_weights  # noqa: E402
from amp_prune.surgery import apply_plan, remove_blocks  # noqa: E402
from amp_prune.width.budget import count_params  # noqa: E402
from amp_prune.width.criteria import ScoreContext  # noqa: E402
from amp_prune.width.planner import plan_width  # noqa: E402


def speed(args, lm, calib, device) -> list[dict]:
    rows = []
    n_total = lm.spec.dims(lm.model.config)["n_layers"]
    for n in args.layer_counts:
        model = copy.deepcopy(lm.model)
        if n < n_total:
            remove_blocks(model, lm.spec, list(range(n, n_total)))
        row = {"layers": n}
        for use_cache in (True, False):
            s = DepthSearch(model, lm.spec, calib, device, placement="device" if use_cache else "recompute",
                            progress=False)
            t = time.perf_counter()
            cache = s.prefix_pass()
            s.set_reference(cache)
            s.score(cache, ("cka",))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["with cache s" if use_cache else "without cache s"] = time.perf_counter() - t
        row["block-forwards with"] = n + n * (n - 1) // 2
        row["block-forwards without"] = n + n * (n - 1)
        row["speed-up"] = row["without cache s"] / row["with cache s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def needed_margin(plan) -> float:
    """The smallest margin under which the bound held for every candidate of an exact (rescore all) search:
    max over steps s and candidates i of (theta_i(s-1) - theta_i(s)) / drift(s-1)."""
    worst = 0.0
    for prev, cur in zip(plan.steps, plan.steps[1:]):
        before = dict(zip(prev.candidates, prev.metrics["cka"]))
        for i, c in zip(cur.candidates, cur.metrics["cka"]):
            if prev.drift:
                worst = max(worst, (angle(before[i]) - angle(c)) / prev.drift)
    return worst


def count_forwards(model, spec):
    """A counter of block calls (one per batch) and the hook handles that feed it."""
    n = [0]
    hooks = [layer.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
             for layer in spec.get_layers(model)]
    return n, hooks


def search(args, lm, device) -> list[dict]:
    """The iterative CKA search of --blocks blocks, exact and bounded, at several token caps, side by side."""
    calib, _ = build_batches(lm.tokenizer, num_samples=64, seq_len=512)  # the CLI's calibration
    wiki = text_windows(lm.tokenizer, wikitext_text(), args.seq_len, max_windows=args.windows)
    rows, exact_blocks = [], None
    for samples, seq_len, rescore, margin in args.search_rows:
        batches = depth_batches(calib, samples, seq_len)
        n, hooks = count_forwards(lm.model, lm.spec)
        t = time.perf_counter()
        plan = plan_depth(lm.model, lm.spec, batches, args.blocks, device=device, rescore=rescore, margin=margin,
                          progress=False)
        wall = time.perf_counter() - t
        for h in hooks:
            h.remove()
        model = copy.deepcopy(lm.model)
        remove_blocks(model, lm.spec, plan.removed_layers)
        exact_blocks = exact_blocks or plan.removed_layers
        rows.append({"search": f"{samples} x {seq_len}, " + ("exact" if rescore == "all" else f"bounded, margin {margin:g}"),
                     "tokens": tokens_of(batches), "block-forwards": n[0] // len(batches), "search s": wall,
                     "blocks": str(plan.removed_layers), "same as first row": plan.removed_layers == exact_blocks,
                     "wikitext2 ppl": perplexity(model, lm.spec, wiki, device),
                     "needed margin": f"{needed_margin(plan):.2f}" if rescore == "all" else "",
                     "rescored per step": " ".join(str(len(st.rescored)) if st.rescored else str(len(st.candidates))
                                                   for st in plan.steps)})
        print(rows[-1], flush=True)
        rows[-1]["steps"] = [step_to_dict(st) for st in plan.steps]  # JSON only: every score of every step
    return rows


def robust(args, lm, device) -> list[dict]:
    """Each ``--settings`` entry (SEQUENCES x TOKENS, pooled or per-token CKA, the model's dtype or bf16 autocast,
    as ``--depth-dtype`` sets them) searched on ``--slices`` disjoint sets of calibration sequences (slice k:
    sequences [k S, (k + 1) S) of one pool of C4 chunks of 512, the CLI's 64 first, each cut to its first
    TOKENS); the search time and the chosen blocks' WikiText-2 ppl."""
    settings = []
    for entry in args.settings:
        cap, *flags = entry.split(":")
        samples, seq_len = (int(v) for v in cap.split("x"))
        settings.append((samples, seq_len, "token" if "token" in flags else "pooled", "bf16" in flags))
    pool, _ = build_batches(lm.tokenizer, num_samples=max(s[0] for s in settings) * args.slices, seq_len=512)
    rows_of = [(ids, mask) for b in pool for ids, mask in zip(b.input_ids, b.attention_mask)]
    pad = next((int(b.input_ids[b.attention_mask == 0][0]) for b in pool if (b.attention_mask == 0).any()), 0)
    wiki = text_windows(lm.tokenizer, wikitext_text(), args.seq_len, max_windows=args.windows)
    ppl_of: dict[tuple[int, ...], float] = {}  # the same blocks are evaluated once
    rows = []
    for samples, seq_len, rep, bf16 in settings:
        for k in range(args.slices):
            chunks = [ids[: int(mask.sum())][:seq_len].tolist()
                      for ids, mask in rows_of[k * samples:(k + 1) * samples]]
            batches = to_batches(chunks, 8, pad)
            t = time.perf_counter()
            plan = plan_depth(lm.model, lm.spec, batches, args.blocks, device=device, representation=rep,
                              dtype="bfloat16" if bf16 else "model", progress=False)
            wall = time.perf_counter() - t
            key = tuple(plan.removed_layers)
            if key not in ppl_of:
                model = copy.deepcopy(lm.model)
                remove_blocks(model, lm.spec, plan.removed_layers)
                ppl_of[key] = perplexity(model, lm.spec, wiki, device)
            rows.append({"setting": f"{samples} x {seq_len} {rep}" + (" bf16" if bf16 else ""), "slice": k,
                         "tokens": tokens_of(batches), "search s": wall, "blocks": str(plan.removed_layers),
                         "wikitext2 ppl": ppl_of[key]})
            print(rows[-1], flush=True)
    return rows


def robust_summary(rows: list[dict]) -> list[dict]:
    """One line per setting: mean search time, mean / median / worst ppl of its chosen blocks over the slices."""
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        ppl = [r["wikitext2 ppl"] for r in mine]
        out.append({"setting": name, "slices": len(mine),
                    "mean search s": statistics.mean(r["search s"] for r in mine), "mean ppl": statistics.mean(ppl),
                    "median ppl": statistics.median(ppl), "worst ppl": max(ppl),
                    "ppl per slice": " ".join(f"{v:.1f}" for v in ppl)})
    return out


def memory_one(args) -> None:
    """One memory measurement in a fresh process (so peak RSS is its own): prints one JSON row."""
    lm = load_model(args.model, device="cpu")
    n_total = lm.spec.dims(lm.model.config)["n_layers"]
    if args.layers < n_total:
        remove_blocks(lm.model, lm.spec, list(range(args.layers, n_total)))
    seqs = max(1, args.tokens // 128)
    calib, _ = build_batches(lm.tokenizer, num_samples=seqs, seq_len=128)
    d = lm.spec.dims(lm.model.config)
    est = estimate_bytes(calib, d["n_layers"], d["hidden"], torch.float32)
    s = DepthSearch(lm.model, lm.spec, calib, torch.device("cpu"), placement=args.placement, progress=False)
    warm = DepthSearch(lm.model, lm.spec, calib[:1], torch.device("cpu"), placement="recompute", progress=False)
    warm.prefix_pass().close()  # warm-up: page in every (memory-mapped) weight, fill the allocator and thread pools
    base, rec = rss_mb(), {}
    with measure(rec, "pass", torch.device("cpu")):
        cache = s.prefix_pass()
        s.ref = s.represent(cache[max(cache)])
        stored = cache.stored_bytes()
        for i in s.alive[-2:]:  # two candidates' scoring on top of the cache
            s.cka_of(cache, i)
    print(json.dumps({"layers": args.layers, "tokens": tokens_of(calib), "cache": args.placement,
                      "estimate MB": est / 2**20, "stored MB": stored / 2**20,
                      "peak RSS above the loaded model MB": rec["pass"]["peak_rss_mb"] - base}))


def memory(args) -> list[dict]:
    rows = []
    for layers in args.memory_layers:
        for tokens in args.memory_tokens:
            for placement in ("device", "disk", "recompute"):
                out = subprocess.run([sys.executable, __file__, "memory-one", "--model", args.model, "--layers",
                                      str(layers), "--tokens", str(tokens), "--placement", placement],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    return rows


def quality(args, lm, calib, device) -> list[dict]:
    """Every depth criterion at the budget of ``--blocks`` blocks, with and without the stand-in, beside hybrid and
    AMP width (each with and without the refit), on the same calibration and WikiText-2 windows."""
    wiki = text_windows(lm.tokenizer, wikitext_text(), args.seq_len, max_windows=args.windows)
    dense = lm.model
    total = count_params(dense)
    ratio = args.blocks * count_params(lm.spec.get_layers(dense)[0]) / total
    rows = [{"method": "dense", "removed": 0.0, "wikitext2 ppl": perplexity(dense, lm.spec, wiki, device)}]

    def record(name, plan, search_s, extra=""):
        t = time.perf_counter()
        if plan.needs_weights:
            plan.weights = compute_weights(dense, lm.spec, plan, calib, device, progress=False)
        refit_s = time.perf_counter() - t
        model = apply_plan(copy.deepcopy(dense), plan, lm.spec)
        d = lm.spec.dims(model.config)
        rows.append({"method": name, "removed": 1 - count_params(model) / total, "search s": search_s,
                     "refit s": refit_s, "wikitext2 ppl": perplexity(model, lm.spec, wiki, device),
                     "blocks / shape": extra or f"{plan.removed_layers}, {d['n_heads']}/{d['n_kv']} heads, "
                                                 f"{d['intermediate']} ch"})
        print(rows[-1], flush=True)

    # representation matters only where CKA is used (cka, consensus, hybrid); angular/bi/kl are per token
    for crit, rep, one_shot in (args.criteria if "criteria" in args.parts else []):
        t = time.perf_counter()
        plan = plan_depth(dense, lm.spec, calib, args.blocks, device=device, criterion=crit, representation=rep,
                          iterative=not one_shot, progress=False)
        search_s = time.perf_counter() - t
        name = (f"{crit} ({rep})" if crit in ("cka", "consensus") else crit) + (" one-shot" if one_shot else "")
        for standin in (False, True):
            plan.standin, plan.standin_damp, plan.weights = standin, args.standin_damp if standin else None, None
            record(name + (" + stand-in" if standin else ""), plan, search_s, str(plan.removed_layers))
    hybrids = {"plain": ("", dict(attn_units="uniform", refit="none", standin=False)),
               "default": (" + final refit + stand-in (CLI default)",
                           dict(attn_units="auto", refit="onepass", standin=True)),
               "compare": (" + refit candidates + stand-in",
                           dict(attn_units="auto", refit="onepass", standin=True, compare_refit=True))}
    for label, opts in ([hybrids[h] for h in args.hybrids] if "hybrid" in args.parts else []):
        t = time.perf_counter()
        plan = plan_hybrid(dense, lm.spec, calib, ratio, device=device, progress=False, damp=args.damp,
                           standin_damp=args.standin_damp, **opts)
        record("hybrid (pooled)" + label, plan, time.perf_counter() - t,
               "choices " + "".join(st.choice[0] for st in plan.steps))
    for split, refit in ((("uniform", "none"), ("auto", "onepass")) if "width" in args.parts else ()):
        t = time.perf_counter()
        plan = plan_width(dense, lm.spec, calib, ratio=ratio, mode="group", criterion="amp", attn_units=split,
                          refit=refit, damp=args.damp, ctx=ScoreContext(device, progress=False))
        record(f"amp width ({split}, refit {refit})", plan, time.perf_counter() - t)
    rand = []
    for seed in range(args.random_trials if "random" in args.parts else 0):
        model = copy.deepcopy(dense)
        remove_blocks(model, lm.spec, random_blocks(len(lm.spec.get_layers(dense)), args.blocks, seed))
        rand.append(perplexity(model, lm.spec, wiki, device))
    if rand:
        rows.append({"method": f"random blocks (mean of {args.random_trials})", "removed": rows[1]["removed"],
                     "wikitext2 ppl": statistics.mean(rand),
                     "blocks / shape": f"min {min(rand):.1f}, max {max(rand):.1f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "quality", "search", "robust", "memory", "memory-one"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--layer-counts", type=int, nargs="+", default=[6, 12, 18, 24, 30])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--random-trials", type=int, default=5)
    ap.add_argument("--damp", type=float, default=0.01, help="ridge damping of the width refit")
    ap.add_argument("--standin-damp", type=lambda v: v if v == "auto" else float(v), default="auto",
                    help="damping of the stand-in: auto (cross-validated, the CLI default) or a number")
    ap.add_argument("--all-criteria", action="store_true",
                    help="also cka per-token, kl and one-shot cka (about 9 more CPU minutes)")
    ap.add_argument("--parts", nargs="+", choices=["criteria", "hybrid", "width", "random"],
                    default=["criteria", "hybrid", "width", "random"], help="quality rows to run (default: all)")
    ap.add_argument("--hybrids", nargs="+", choices=["plain", "default", "compare"],
                    default=["plain", "default", "compare"],
                    help="hybrid rows: plain candidates and no refit; plain candidates and the final plan refit "
                         "(the CLI default); refit candidates (--compare-refit)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    ap.add_argument("--margins", type=float, nargs="+", default=[2.0, 1.0], help="search: bounded margins to run")
    ap.add_argument("--caps", nargs="+", default=["16x128", "16x64", "32x64"],
                    help="search: SEQUENCESxTOKENS caps of the bounded rows (the exact row uses the first)")
    ap.add_argument("--settings", nargs="+", default=["16x128", "16x128:bf16", "16x64:bf16", "32x32:bf16", "16x32"],
                    help="robust: SEQUENCESxTOKENS[:token][:bf16] search settings (pooled CKA unless :token; "
                         "the model's dtype unless :bf16, autocast)")
    ap.add_argument("--slices", type=int, default=4, help="robust: disjoint calibration samples per setting")
    ap.add_argument("--memory-layers", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--memory-tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--layers", type=int, default=30, help="memory-one: blocks kept")
    ap.add_argument("--tokens", type=int, default=2048, help="memory-one: calibration tokens (sequences of 128)")
    ap.add_argument("--placement", default="device", help="memory-one: --depth-cache")
    args = ap.parse_args()
    if args.mode == "memory-one":
        return memory_one(args)
    if args.mode == "memory":
        rows = memory(args)
        print(f"\n{args.model}, fp32, CPU: one prefix pass plus two candidates, in a fresh process each\n")
        print_table(rows, ["layers", "tokens", "cache", "estimate MB", "stored MB", "peak RSS above the loaded model MB"])
        return save_json(args.json, rows)
    caps = [tuple(int(v) for v in c.split("x")) for c in args.caps]
    args.search_rows = ([(*caps[0], "all", 0.0)] + [(*caps[0], "bounded", m) for m in args.margins]
                        + [(*c, "bounded", args.margins[0]) for c in caps[1:]])
    args.criteria = [("cka", "pooled", False), ("angular", "pooled", False), ("bi", "pooled", False),
                     ("consensus", "pooled", False)]
    if args.all_criteria:
        args.criteria += [("cka", "token", False), ("kl", "pooled", False), ("cka", "pooled", True)]
    device = resolve_device(args.device)
    lm = load_model(args.model, device=device)
    calib, _ = build_batches(lm.tokenizer, num_samples=args.num_samples, seq_len=args.calib_seq_len)
    tokens = sum(b.num_tokens for b in calib)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.mode == "search":
        rows = search(args, lm, device)
        print(f"\n{args.model}: iterative CKA search for {args.blocks} blocks (pooled), no stand-in; calibration "
              f"64 x 512 (the CLI's) cut to SEQUENCES x TOKENS; WikiText-2 test {args.windows} x {args.seq_len}; "
              f"{where}\n")
        print_table(rows, ["search", "tokens", "block-forwards", "search s", "rescored per step", "blocks",
                           "same as first row", "wikitext2 ppl", "needed margin"])
    elif args.mode == "robust":
        rows = robust(args, lm, device)
        print(f"\n{args.model}: iterative CKA search for {args.blocks} blocks (bounded rescoring, the default), no "
              f"stand-in; {args.slices} disjoint calibration samples per setting; WikiText-2 test {args.windows} x "
              f"{args.seq_len}; {where}\n")
        print_table(rows, ["setting", "slice", "tokens", "search s", "blocks", "wikitext2 ppl"])
        print()
        print_table(robust_summary(rows), ["setting", "slices", "mean search s", "mean ppl", "median ppl",
                                           "worst ppl", "ppl per slice"])
    elif args.mode == "speed":
        rows = speed(args, lm, calib, device)
        print(f"\n{args.model} truncated to L blocks; one CKA removal step over {tokens} calibration tokens; {where}\n")
        print_table(rows, ["layers", "block-forwards with", "with cache s", "block-forwards without",
                           "without cache s", "speed-up"])
    else:
        rows = quality(args, lm, calib, device)
        print(f"\n{args.model}: budget = {args.blocks} blocks; search on {tokens} calibration tokens; WikiText-2 test "
              f"{args.windows} x {args.seq_len} tokens; {where}\n")
        print_table(rows, ["method", "removed", "wikitext2 ppl", "search s", "refit s", "blocks / shape"])
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
