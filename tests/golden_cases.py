"""Golden outputs of every planner, recorded before the stage-per-folder move (issue 11).

``run_case`` prunes a model with one method and returns what must never change by a
refactor: the plan's per-block removals, the removed blocks, the per-step choices, the
exported config shape and the exported logits on a fixed prompt. The recorded values live in
``tests/data/golden/*.json``; ``tests/test_golden.py`` reruns the cases and compares.

Record again (only when a change is *meant* to alter results) with
``python tests/golden_cases.py tiny|smollm2``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
PROMPT = [1, 40, 71, 68, 3, 80, 66, 72, 74, 75, 69, 88, 29, 41, 77, 90]  # fixed ids, valid for both vocabularies
CALIB = dict(num_samples=8, seq_len=64, eval_samples=4, batch_size=4, progress=False)
# what the pre-move code did: no refit, no stand-in, the attention share nearest the uniform one (1 unit here),
# the block search in the model's dtype
OLD = dict(refit="none", stand_in=False, depth_dtype="model")
CASES = {
    "tiny": {
        "width_group": dict(method="width", ratio=0.3, gqa_mode="group", attn_units="1", **OLD),
        "width_heads": dict(method="width", ratio=0.3, gqa_mode="heads", attn_units="1", **OLD),
        "cka": dict(method="cka", layers=2, **OLD),
        "consensus": dict(method="cka", layers=2, layer_criterion="consensus", **OLD),
        "hybrid": dict(method="hybrid", ratio=0.3, **OLD),
    },
    "smollm2": {
        "width_group": dict(method="width", ratio=0.3, gqa_mode="group", attn_units="1", **OLD),
        "width_heads": dict(method="width", ratio=0.3, gqa_mode="heads", attn_units="1", **OLD),
        "cka": dict(method="cka", layers=3, **OLD),
        "consensus": dict(method="cka", layers=2, layer_criterion="consensus", **OLD),
        "hybrid": dict(method="hybrid", ratio=0.1, **OLD),
    },
}


def tiny_dir(root: Path) -> Path:
    """A 6-block tiny GQA Llama (8 query / 2 KV heads) with the character tokenizer."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import char_tokenizer, tiny_model

    d = root / "tiny-llama-gqa"
    if not d.exists():
        tiny_model("llama_gqa", layers=6).save_pretrained(d)
        char_tokenizer().save_pretrained(d)
    return d


def _steps(plan: dict) -> list:
    out = []
    for s in plan.get("steps", []):
        out.append(s.get("choice", "") + ":" + str(s.get("removed", s.get("removed_block", ""))))
    return out


@torch.no_grad()
def exported_logits(out: Path) -> dict:
    """Logits of the exported dir, reloaded with plain from_pretrained, on ``PROMPT``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits = model(torch.tensor([PROMPT])).logits[0].double()
    return {"head": logits[:, :16].tolist(), "argmax": logits.argmax(-1).tolist(),
            "logsumexp": torch.logsumexp(logits, -1).tolist()}


def run_case(model_dir: Path, case: dict, work: Path) -> dict:
    """Prune ``model_dir`` with ``case`` through the public API and collect the golden record."""
    from amp_prune import PruneConfig, prune

    out = work / "out"
    prune(PruneConfig.from_flat(model=str(model_dir), out=str(out), overwrite=True, **CALIB, **case))
    plan = json.loads((out / "pruning_plan.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    return {"layers": plan["layers"], "removed_layers": plan["removed_layers"], "steps": _steps(plan),
            "config": {k: cfg.get(k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                "intermediate_size", "num_hidden_layers", "architectures")},
            "logits": exported_logits(out)}


def record(which: str) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if which == "tiny":
            model_dir = tiny_dir(Path(tmp))
        else:
            from amp_prune.io.load import demo_model_dir
            model_dir = demo_model_dir()
        result = {name: run_case(model_dir, case, Path(tmp) / name) for name, case in CASES[which].items()}
    (GOLDEN_DIR / f"{which}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    record(sys.argv[1])
