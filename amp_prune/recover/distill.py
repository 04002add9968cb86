"""Distillation from the dense model: the teacher, its resolution and checks, and the KD loss.

For logits ``z`` ``[B, T, V]`` of the student (S) and the teacher (Te), over the positions
that carry a label (the next token is real and, for instruction data, part of the response),
with temperature ``tau``:

    KD = tau^2 * mean_t KL( softmax(z_Te,t / tau) || softmax(z_S,t / tau) )

(``tau^2`` keeps the gradient scale independent of ``tau``; Hinton et al. 2015, Minitron
2407.14679 uses the logit-only form). ``--loss kd+lm`` adds ``lm_weight`` times the usual
next-token cross-entropy on the same positions. The teacher runs in eval mode under
``no_grad`` in the student's dtype; its logits are recomputed at every step, so a resumed run
sees exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from amp_prune.errors import AmpPruneError
from amp_prune.recover.data import IGNORE


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: the positions whose next token has a label (``labels[:, 1:] != -100``)."""
    return labels[:, 1:] != IGNORE


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * mean KL(p_teacher || p_student)`` over ``mask``; logits ``[B, T, V]``, mask ``[B, T-1]``.

    Position ``t``'s logits predict token ``t+1``, so the logits are cut to ``[:, :-1]`` to align with
    :func:`label_mask`. Computed in fp32; 0 (with a gradient path) when nothing is masked in.
    """
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return temperature ** 2 * kl


def lm_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (logits ``[B, T, V]``, labels ``[B, T]``)."""
    mask = label_mask(labels)
    if not mask.any():
        return student.sum() * 0.0
    return F.cross_entropy(student[:, :-1][mask].float(), labels[:, 1:][mask])


def recorded_source(model_dir: str, depth: int = 3) -> str | None:
    """The dense model a pruned (or recovered) dir came from, as its ``run.json`` records it; None if unknown.

    A pruning run records ``config.model``. A recovery run records ``config.teacher``; when it had
    none (``--loss lm``), the source of the model it recovered is looked up in turn.
    """
    run = Path(model_dir).expanduser() / "run.json"
    if depth <= 0 or not run.is_file():
        return None
    try:
        cfg = json.loads(run.read_text()).get("config", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(cfg, dict):
        return None
    if "teacher" in cfg:  # a recovery run
        return cfg["teacher"] or (recorded_source(cfg["model"], depth - 1) if cfg.get("model") else None)
    return cfg.get("model") or None


def resolve_teacher(model_dir: str, teacher: str | None) -> str:
    """``teacher`` or the recorded source of ``model_dir``; a one-line error when neither is known."""
    if teacher:
        return teacher
    source = recorded_source(model_dir)
    if not source:
        raise AmpPruneError(f"no teacher for distillation: {model_dir} has no run.json naming the model it was pruned "
                            "from; pass --teacher DIR_OR_ID, or --loss lm to train without one")
    return source


def check_teacher(teacher, teacher_tok, student, student_tok, name: str) -> None:
    """Teacher and student must share the vocabulary: same output size and the same token -> id map."""
    tv, sv = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise AmpPruneError(f"teacher {name} has a vocabulary of {tv} logits, the student {sv}; "
                            "distil from the model it was pruned from (same tokenizer), or pass --loss lm")
    if teacher_tok is not None and student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise AmpPruneError(f"teacher {name} uses a different tokenizer from the student's; distil from the model it "
                            "was pruned from, or pass --loss lm")


def prepare_teacher(teacher: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode, no gradients, the student's dtype."""
    teacher.eval().requires_grad_(False)
    return teacher.to(dtype)
