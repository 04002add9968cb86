"""LoRA recovery of a pruned model, merged into a plain HF checkpoint.

LoRA (through peft) on every attention and MLP projection; the defaults follow the AMP
reference: r=8, alpha=16, dropout 0.05, lr 3e-4. After training, ``W' = W + (alpha/r) B A``
is merged into the base weights and exported with the same atomic write, model card and
reload check as pruning. A checkpoint (adapter, optimizer, scheduler, RNG state) is written
every ``save_every`` steps and on Ctrl-C; rerunning the same command resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amp_prune.calib.data import Batch
from amp_prune.config import FinetuneConfig
from amp_prune.errors import AmpPruneError
from amp_prune.io.card import finetune_card
from amp_prune.io.export import check_out_dir, export
from amp_prune.io.load import load_model, resolve_device, resolve_dtype
from amp_prune.recover.data import IGNORE, TrainBatch, load_examples, to_train_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def loss_perplexity(model, batches: list[TrainBatch], device: torch.device) -> float:
    """``exp`` of the mean next-token NLL over label tokens (``labels != -100``)."""
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits.float()
        tgt = b.labels[:, 1:].to(device)
        keep = tgt != IGNORE
        if keep.any():
            nll += torch.nn.functional.cross_entropy(logits[:, :-1][keep], tgt[keep], reduction="sum").item()
            n += int(keep.sum())
    return math.exp(nll / n) if n else float("nan")


def _ckpt_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.finetune-ckpt"


def _fingerprint(cfg: FinetuneConfig) -> dict:
    keep = ("model", "data", "lr", "lora_r", "lora_alpha", "lora_dropout", "seq_len", "batch_size", "grad_accum",
            "seed", "steps", "epochs", "warmup_ratio", "eval_samples", "data_field")
    return {k: getattr(cfg, k) for k in keep}


def _save_ckpt(path: Path, peft_model, opt, sched, step: int, rng: torch.Tensor, cfg: FinetuneConfig) -> None:
    from peft import get_peft_model_state_dict
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": get_peft_model_state_dict(peft_model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng": rng}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(_fingerprint(cfg)))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def finetune(config: FinetuneConfig, *, on_step: Callable[[int], None] | None = None) -> dict:
    """Train LoRA adapters on ``config.data``, merge them, export to ``config.out``; return the summary."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import get_scheduler

    config.validate()
    t0 = time.perf_counter()
    out = check_out_dir(config.out or config.default_out(), overwrite=config.overwrite)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    lm = load_model(config.model, device=device, dtype=dtype)
    check_out_dir(out, overwrite=config.overwrite, input_path=lm.path)
    tok = lm.tokenizer
    kind, examples = load_examples(config.data, tok, seq_len=config.seq_len, seed=config.seed,
                                   field=config.data_field)
    if len(examples) <= config.eval_samples:
        raise AmpPruneError(f"training data {config.data} has {len(examples)} examples; it needs more than "
                            f"--eval-samples {config.eval_samples}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    held = to_train_batches(examples[:config.eval_samples], config.batch_size, pad)
    train = to_train_batches(examples[config.eval_samples:], config.batch_size, pad)
    per_epoch = math.ceil(len(train) / config.grad_accum)
    total_steps = config.steps or max(1, round((config.epochs or 1.0) * per_epoch))
    ppl_before = loss_perplexity(lm.model, held, device) if held else float("nan")

    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()
        lm.model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lm.spec.projection_names(), task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=round(config.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    ckpt = _ckpt_dir(out)
    start = 0
    if (ckpt / "state.pt").is_file():
        if json.loads((ckpt / "config.json").read_text()) != _fingerprint(config):
            raise AmpPruneError(f"checkpoint {ckpt} is from a run with other settings; delete it to start afresh")
        state = torch.load(ckpt / "state.pt", weights_only=False)
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        log.info("resuming from step %d (%s)", start, ckpt)

    model.train()
    bar = tqdm(range(start, total_steps), desc=f"LoRA fine-tuning ({kind})", disable=not config.progress,
               initial=start, total=total_steps)
    losses: list[float] = []
    completed, rng = start, torch.get_rng_state()  # saved on interrupt: the last finished step and the RNG after it
    try:
        for step in bar:
            if on_step is not None:
                on_step(step)
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                g = step * config.grad_accum + micro
                perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + g // len(train)))
                b = train[perm[g % len(train)]]
                loss = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                             labels=b.labels.to(device)).loss / config.grad_accum
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            completed, rng = step + 1, torch.get_rng_state()
            losses.append(loss_sum)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                _save_ckpt(ckpt, model, opt, sched, step + 1, torch.get_rng_state(), config)
    except KeyboardInterrupt:
        _save_ckpt(ckpt, model, opt, sched, completed, rng, config)
        raise AmpPruneError(f"interrupted after step {completed}/{total_steps}; checkpoint saved to {ckpt}; "
                            f"rerun the same command to resume") from None
    bar.close()
    model.eval()
    merged = model.merge_and_unload()
    ppl_after = loss_perplexity(merged, held, device) if held else float("nan")
    summary = {"name": out.name, "source": config.model, "method": f"LoRA recovery ({kind} data, {total_steps} steps)",
               "steps": total_steps, "resumed_from": start, "final_loss": losses[-1] if losses else None,
               "ppl_before": ppl_before, "ppl_after": ppl_after, "train_examples": len(examples) - config.eval_samples,
               "heldout_examples": config.eval_samples, "data_kind": kind}
    timings = {"total_s": time.perf_counter() - t0}
    check = export(merged, tok, out, check_batches=[Batch(b.input_ids, b.attention_mask) for b in (held or train)[:1]],
                   device=device, spec=lm.spec, overwrite=config.overwrite, input_path=lm.path,
                   files={"run.json": {"config": asdict(config), "summary": summary, "timings": timings,
                                       "losses": losses}},
                   card=lambda _diff: finetune_card(summary, config))
    shutil.rmtree(ckpt, ignore_errors=True)
    summary["export_max_abs_diff"] = check.max_abs_diff
    summary["out"] = str(out)
    summary["total_s"] = time.perf_counter() - t0
    return summary
