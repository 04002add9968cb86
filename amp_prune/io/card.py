"""The model card (``README.md``) of an output dir: YAML header, what was removed, the numbers, how to load it.

The tables inside come from :mod:`amp_prune.report`, the same renderers the CLI prints.
"""

from __future__ import annotations

from amp_prune import report
from amp_prune.io.hub import card_header


def _load_section(name: str) -> list[str]:
    return ["## Load", "", "No custom code and no `trust_remote_code` are needed:", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")', f'tok = AutoTokenizer.from_pretrained("{name}")',
            f'pipe = pipeline("text-generation", model="{name}")', "```", ""]


def model_card(s: dict, max_abs_diff: float) -> str:
    """Card of a pruned model from the run summary ``s`` and the export check's max |logit difference|."""
    name = s.get("name", "path/to/this/dir")
    lines = [
        card_header(s.get("card_meta", {}), ["pruned", "amp-prune"]), "",
        f"# {name}", "",
        f"Structurally pruned from `{s['source']}` by amp-prune ({s['method']}).", "",
        report.markdown_table(["", "before", "after"], report.summary_rows(s)), "",
        (f"Target ratio {s['target_ratio']:.3f}, achieved " if s.get("target_ratio") is not None else "Achieved ")
        + (f"{s['achieved_block_ratio']:.4f} of the decoder blocks' parameters removed ({s['achieved_ratio']:.4f} of "
           "all)." if s.get("ratio_of") == "blocks" else f"{s['achieved_ratio']:.4f} of all parameters removed"
           + (f" ({s['achieved_block_ratio']:.4f} of the decoder blocks')." if "achieved_block_ratio" in s else "."))
        + (f" Removed blocks (original indexing): {s['removed_layers']}." if s.get("removed_layers") else ""),
        f"Perplexity: {s.get('ppl_protocol') or 'not measured'}.", "",
        f"The export was reloaded with plain `from_pretrained`; max |logit difference| = {max_abs_diff:.2e}.",
    ]
    if s.get("split"):
        lines += ["", report.format_split(s["split"]) + "."]
    if s.get("eval"):
        lines += ["", "## Evaluation (dense vs pruned, same settings)", "",
                  report.markdown_side_by_side(s["eval"]["dense"], s["eval"]["pruned"])]
    if s.get("bias_check"):
        lines += ["", "## Fairness check (bias_probe, dense vs pruned)", "", report.markdown_bias_comparison(s["bias_check"])]
    lines += ["", *_load_section(name),
              "`pruning_plan.json` lists the removed heads, KV groups and channels per block (original indexing)",
              "and replays on the original model with `amp_prune.apply_plan`; `run.json` records the config,",
              "seed, package versions and timings.", ""]
    return "\n".join(lines)


def finetune_card(s: dict, c) -> str:
    """Card of a recovered model from the fine-tuning summary ``s`` and its ``FinetuneConfig`` ``c``."""
    tag = "full-finetuned" if c.full else "lora-recovered"
    how = ("by full fine-tuning" if c.full else "by LoRA, merged into the base weights")
    trained = (f"- full fine-tuning, AdamW, lr={s['lr']} (linear schedule)" if c.full else
               f"- LoRA r={c.lora_r}, alpha={c.lora_alpha}, dropout={c.lora_dropout}, lr={s['lr']} (linear schedule)")
    loss = {"kd": f"distillation from `{s['teacher']}` (tau^2 KL, tau={c.temperature})",
            "lm": "next-token cross-entropy",
            "kd+lm": f"distillation from `{s['teacher']}` (tau={c.temperature}) + {c.lm_weight} x next-token "
                     "cross-entropy"}[c.loss]
    kl = (f"- held-out KL to the teacher: {s['kl_before']:.3f} -> {s['kl_after']:.3f} nats/token"
          if s.get("kl_before") is not None else None)
    lines = [card_header(s.get("card_meta", {}), ["pruned", "amp-prune", tag]), "",
             f"# {s['name']}", "", f"`{s['source']}` after recovery by amp-prune, {how}.", "",
             f"- data: `{c.data}` ({s['data_kind']}), {s['train_examples']} training examples, {s['steps']} steps of "
             f"{c.batch_size} x {c.grad_accum} sequences of <= {c.seq_len} tokens",
             f"- loss: {loss}", trained,
             f"- held-out perplexity ({s['heldout_examples']} examples not trained on): {s['ppl_before']:.2f} -> "
             f"{s['ppl_after']:.2f}", *([kl] if kl else []), "", *_load_section(s["name"])]
    return "\n".join(lines)
