"""Recovery of a pruned model (LoRA or full fine-tuning, LM loss or distillation), exported as a plain HF checkpoint.

* LoRA (through peft) on every attention and MLP projection; the defaults follow the AMP
  reference: r=8, alpha=16, dropout 0.05, lr 3e-4. After training, ``W' = W + (alpha/r) B A``
  is merged into the base weights. ``--full`` trains every weight with AdamW instead (lr 5e-5).
* The loss (:mod:`amp_prune.recover.distill`): ``lm`` (default, measured better at 100 CPU steps)
  is next-token cross-entropy; ``kd`` distils the dense teacher, ``tau^2 KL(p_teacher || p_student)``;
  ``kd+lm`` adds both.
  Either is computed on the labelled tokens only (real tokens; responses for instruction data).

The result is exported with the same atomic write, model card and reload check as pruning.
A checkpoint (trained weights, optimizer, scheduler, RNG state) is written every
``save_every`` steps and on Ctrl-C; rerunning the same command resumes from it exactly (the
teacher's logits are recomputed, never cached).
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

from amp_prune.calib.data import Batch, check_source
from amp_prune.config import FinetuneConfig
from amp_prune.errors import AmpPruneError
from amp_prune.io.card import finetune_card
from amp_prune.io.export import check_out_dir, export
from amp_prune.io.hub import source_metadata
from amp_prune.io.load import ALIASES, load_model, resolve_device, resolve_dtype
from amp_prune.recover.data import TrainBatch, load_examples, to_train_batches
from amp_prune.recover.distill import (check_teacher, kd_loss, label_mask, lm_loss, prepare_teacher,
                                       resolve_teacher)
from amp_prune.recover.parallel import Parallel

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout(model, teacher, batches: list[TrainBatch], device: torch.device) -> tuple[float, float | None]:
    """``(perplexity, KL to the teacher)`` over the labelled tokens of ``batches``, from one student pass.

    Perplexity is ``exp`` of the mean next-token NLL; the KL is the mean ``KL(p_teacher || p_student)``
    per token at tau = 1 (None without a teacher, or when nothing is labelled; the perplexity is then ``nan``).
    """
    nll, kl, n = 0.0, 0.0, 0
    for b in batches:
        ids, mask, labels = b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device)
        k = int(label_mask(labels).sum())
        if not k:
            continue
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll += lm_loss(logits, labels).item() * k
        if teacher is not None:
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            kl += kd_loss(logits, t_logits, label_mask(labels), 1.0).item() * k
        n += k
    if not n:
        return float("nan"), None
    return math.exp(nll / n), None if teacher is None else kl / n


def _ckpt_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.finetune-ckpt"


def _fingerprint(cfg: FinetuneConfig, teacher: str | None) -> dict:
    keep = ("model", "data", "lr", "lora_r", "lora_alpha", "lora_dropout", "seq_len", "batch_size", "grad_accum",
            "seed", "steps", "epochs", "warmup_ratio", "eval_samples", "data_field", "loss", "temperature",
            "lm_weight", "full")
    return {**{k: getattr(cfg, k) for k in keep}, "teacher": teacher}


def _trained_state(model, full: bool) -> dict:
    from peft import get_peft_model_state_dict
    return model.state_dict() if full else get_peft_model_state_dict(model)


def _save_ckpt(path: Path, model, opt, sched, step: int, rng: torch.Tensor, fingerprint: dict, full: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"weights": _trained_state(model, full), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng": rng}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(fingerprint))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_teacher(config: FinetuneConfig, name: str | None, student, tokenizer, device, dtype, given):
    """The teacher (``given`` in-memory ``(model, tokenizer)`` wins), checked against the student's vocabulary."""
    if config.loss == "lm":
        return None
    if given is not None:
        model, tok = given
    else:
        t = load_model(name, device=device, dtype=dtype)
        model, tok = t.model, t.tokenizer
    check_teacher(model, tok, student, tokenizer, name or "in memory")
    return prepare_teacher(model.to(device), dtype)


def _wrap(model, config: FinetuneConfig, spec):
    """``(trainable model, its trained parameters)``: a peft LoRA wrapper, or the model itself with ``--full``."""
    if config.full:
        model.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=spec.projection_names(), task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, lora)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _objective(model, teacher, b: TrainBatch, config: FinetuneConfig, device) -> torch.Tensor:
    """The training loss of one micro-batch (see module docstring)."""
    ids, mask, labels = b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = 0.0
    if config.loss != "kd":
        loss = lm_loss(logits, labels) * (config.lm_weight if config.loss == "kd+lm" else 1.0)
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        loss = loss + kd_loss(logits, t_logits, label_mask(labels), config.temperature)
    return loss


def finetune(config: FinetuneConfig, *, on_step: Callable[[int], None] | None = None,
             teacher: tuple | None = None) -> dict:
    """Recover ``config.model`` on ``config.data``, export to ``config.out``; return the summary.

    ``teacher`` is an in-memory ``(model, tokenizer)`` (the ``--finetune`` chain passes the dense
    model it already holds); otherwise ``--teacher`` or the source in the model's ``run.json`` is loaded.
    Under ``accelerate launch`` the run is data-parallel; processes other than the main one return
    ``{"rank": r, "losses": [...]}`` once training is done, and only the main one exports.
    """
    config.validate()
    par = Parallel.detect(cpu=resolve_device(config.device).type == "cpu")  # launched: data-parallel
    par.check(config.batch_size)
    t0 = time.perf_counter()
    out = check_out_dir(config.out or config.default_out(), overwrite=config.overwrite)
    check_source(config.data, "training data")  # a missing, binary or undecodable file, before any load
    teacher_name = config.teacher
    if config.loss != "lm" and teacher is None:
        teacher_name = resolve_teacher(config.model, config.teacher)  # before any load
    device = par.device or resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    lm = load_model(config.model, device=device, dtype=dtype)
    check_out_dir(out, overwrite=config.overwrite, input_path=lm.path)
    tok = lm.tokenizer
    kind, examples = load_examples(config.data, tok, seq_len=config.seq_len, seed=config.seed,
                                   field=config.data_field)
    if len(examples) <= config.eval_samples:
        raise AmpPruneError(f"training data {config.data} has {len(examples)} examples; it needs more than "
                            f"--eval-samples {config.eval_samples}")
    t_model = _load_teacher(config, teacher_name, lm.model, tok, device, dtype, teacher)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    held = to_train_batches(examples[:config.eval_samples], config.batch_size, pad)
    train = to_train_batches(examples[config.eval_samples:], config.batch_size, pad)
    per_epoch = math.ceil(len(train) / config.grad_accum)
    total_steps = config.steps or max(1, round((config.epochs or 1.0) * per_epoch))
    ppl_before, kl_before = heldout(lm.model, t_model, held, device) if par.main else (None, None)

    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()
        lm.model.enable_input_require_grads()
    model, params = _wrap(lm.model, config, lm.spec)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    from transformers import get_scheduler
    sched = get_scheduler("linear", opt, num_warmup_steps=round(config.warmup_ratio * total_steps),
                          num_training_steps=total_steps)
    ckpt, fingerprint = _ckpt_dir(out), _fingerprint(config, teacher_name)
    start = 0
    if (ckpt / "state.pt").is_file():
        if json.loads((ckpt / "config.json").read_text()) != fingerprint:
            raise AmpPruneError(f"checkpoint {ckpt} is from a run with other settings; delete it to start afresh")
        state = torch.load(ckpt / "state.pt", weights_only=False)
        if config.full:
            model.load_state_dict(state["weights"])
        else:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, state["weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        log.info("resuming from step %d (%s)", start, ckpt)

    mode = "full fine-tuning" if config.full else "LoRA fine-tuning"
    model = par.wrap(model)
    model.train()
    bar = tqdm(range(start, total_steps), desc=f"{mode} ({config.loss}, {kind})",
               disable=not config.progress or not par.main, initial=start, total=total_steps)
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
                batch, weight = par.shard(train[perm[g % len(train)]])
                loss = _objective(model, t_model, batch, config, device) * (weight / config.grad_accum)
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            completed, rng = step + 1, torch.get_rng_state()
            loss_sum = par.mean(loss_sum)
            losses.append(loss_sum)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if par.main and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                _save_ckpt(ckpt, par.unwrap(model), opt, sched, step + 1, torch.get_rng_state(), fingerprint,
                           config.full)
    except KeyboardInterrupt:
        if not par.main:
            raise
        _save_ckpt(ckpt, par.unwrap(model), opt, sched, completed, rng, fingerprint, config.full)
        raise AmpPruneError(f"interrupted after step {completed}/{total_steps}; checkpoint saved to {ckpt}; "
                            f"rerun the same command to resume") from None
    bar.close()
    par.barrier()
    if not par.main:
        return {"rank": par.rank, "losses": losses}
    model = par.unwrap(model)
    model.eval()
    merged = model if config.full else model.merge_and_unload()
    merged.requires_grad_(False)
    ppl_after, kl_after = heldout(merged, t_model, held, device)
    teacher_label = (f"{teacher_name or 'the dense model'} (in memory)" if teacher is not None and t_model is not None
                     else teacher_name if t_model is not None else None)
    what = "full fine-tuning" if config.full else "LoRA recovery"
    summary = {"name": out.name, "source": config.model, "steps": total_steps, "resumed_from": start,
               "card_meta": source_metadata(config.model, Path(config.model) if Path(config.model).exists() else None,
                                            {n: a.card for n, a in ALIASES.items()}),
               "method": f"{what} ({config.loss} loss, {kind} data, {total_steps} steps)", "mode": what,
               "loss": config.loss, "teacher": teacher_label, "temperature": config.temperature,
               "lr": config.learning_rate, "final_loss": losses[-1] if losses else None,
               "ppl_before": ppl_before, "ppl_after": ppl_after, "kl_before": kl_before, "kl_after": kl_after,
               "train_examples": len(examples) - config.eval_samples,
               "heldout_examples": config.eval_samples, "data_kind": kind}
    timings = {"total_s": time.perf_counter() - t0}
    run_config = {**asdict(config), "teacher": teacher_name if t_model is not None else None}
    check = export(merged, tok, out, check_batches=[Batch(b.input_ids, b.attention_mask) for b in (held or train)[:1]],
                   device=device, overwrite=config.overwrite, input_path=lm.path,
                   files={"run.json": {"config": run_config, "summary": summary, "timings": timings,
                                       "losses": losses}},
                   card=lambda _diff: finetune_card(summary, config))
    shutil.rmtree(ckpt, ignore_errors=True)
    summary["export_max_abs_diff"] = check.max_abs_diff
    summary["out"] = str(out)
    summary["total_s"] = time.perf_counter() - t0
    return summary
