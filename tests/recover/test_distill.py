"""Distillation: the KD loss by hand, a student equal to its teacher, KD lowering the KL, exact resume,
full fine-tuning export, and one-line errors for a missing or mismatched teacher."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import assert_one_line_error, run_cli
from tiny import CONFIGS, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, prune
from amp_prune.config import FinetuneConfig
from amp_prune.errors import AmpPruneError
from amp_prune.recover.data import IGNORE
from amp_prune.recover.distill import kd_loss, label_mask, recorded_source, resolve_teacher
from amp_prune.recover.finetune import finetune, heldout

FT = dict(seq_len=32, batch_size=2, eval_samples=4, progress=False, device="cpu")


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog {i} and {i * 7}" for i in range(60)))
    return f


@pytest.fixture
def pruned(tiny_dir, tmp_path):
    """(dense dir, pruned dir): a tiny Llama pruned at 0.3, whose run.json names the dense dir."""
    src = tiny_dir("llama_gqa")
    out = tmp_path / "pruned"
    prune(PruneConfig.from_flat(model=str(src), ratio=0.3, out=str(out), num_samples=4, seq_len=32, eval_samples=2,
                                batch_size=2, progress=False))
    return src, out


def hand_kd(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float) -> float:
    """tau^2 * mean over masked positions of sum_v p_t (log p_t - log p_s), written out with exp and sums."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if not mask[b, i]:
                continue
            zs, zt = s[b, i].double() / tau, t[b, i].double() / tau
            ps, pt = torch.exp(zs) / torch.exp(zs).sum(), torch.exp(zt) / torch.exp(zt).sum()
            total += float((pt * (torch.log(pt) - torch.log(ps))).sum())
            n += 1
    return tau ** 2 * total / n


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_loss_equals_a_hand_computation(tau):
    student, teacher = tiny_model("llama_gqa", seed=1), tiny_model("llama_gqa", seed=2)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    labels = ids.masked_fill(attn == 0, IGNORE)
    labels[0, :3] = IGNORE  # a prompt: no loss on the first tokens
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attn).logits
        t = teacher(input_ids=ids, attention_mask=attn).logits
    mask = label_mask(labels)
    assert int(mask.sum()) == (11 - 2) + 7
    got = float(kd_loss(s, t, mask, tau))
    assert got > 0
    assert got == pytest.approx(hand_kd(s, t, mask, tau), rel=1e-5)


def test_student_equal_to_teacher_has_zero_loss_and_gradient():
    student, teacher = tiny_model("qwen3", seed=3), tiny_model("qwen3", seed=3)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    logits = student(input_ids=ids).logits
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    loss = kd_loss(logits, t, label_mask(ids), 2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-6


def test_kd_lowers_the_kl_to_the_recorded_teacher(pruned, text_file, tmp_path):
    src, student = pruned
    assert recorded_source(str(student)) == str(src)  # the default teacher is the dense model run.json names
    s = finetune(FinetuneConfig(model=str(student), data=str(text_file), out=str(tmp_path / "r"), steps=25, lr=3e-3,
                                loss="kd", **FT))
    assert s["loss"] == "kd" and s["teacher"] == str(src)
    assert s["kl_after"] < 0.7 * s["kl_before"], (s["kl_before"], s["kl_after"])
    # and the KL measured independently on the held-out batches agrees with the summary
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["teacher"] == str(src)
    assert recorded_source(str(tmp_path / "r")) == str(src)  # a recovered dir still names the dense teacher


@pytest.mark.parametrize("loss,full", [("kd", False), ("kd+lm", False), ("kd", True)])
def test_interrupted_distillation_resumes_exactly(pruned, text_file, tmp_path, loss, full):
    _, student = pruned
    cfg = dict(model=str(student), data=str(text_file), steps=6, save_every=100, loss=loss, full=full, **FT)
    with pytest.raises(AmpPruneError, match="interrupted after step 3/6"):
        finetune(FinetuneConfig(out=str(tmp_path / "a"), **cfg),
                 on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else None)
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "a"), **cfg))
    straight = finetune(FinetuneConfig(out=str(tmp_path / "b"), **cfg))
    assert resumed["resumed_from"] == 3 and straight["resumed_from"] == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(a[k], before[k]) for k in a)  # it trained


def test_full_finetune_exports_a_plain_checkpoint(pruned, text_file, tmp_path):
    _, student = pruned
    s = finetune(FinetuneConfig(model=str(student), data=str(text_file), out=str(tmp_path / "f"), steps=3, full=True,
                                **FT))
    assert s["mode"] == "full fine-tuning" and s["export_max_abs_diff"] <= 1e-4 and s["lr"] == 5e-5
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    base = AutoModelForCausalLM.from_pretrained(student)
    assert not any("lora" in k for k in re.state_dict())
    # full fine-tuning changes weights LoRA never touches (norms, embeddings)
    names = [k for k in re.state_dict() if "norm" in k or "embed" in k]
    assert any(not torch.equal(re.state_dict()[k], base.state_dict()[k]) for k in names)
    assert "full fine-tuning" in (tmp_path / "f" / "README.md").read_text()


def test_missing_teacher_is_a_one_line_error(tiny_dir, text_file, tmp_path):
    proc = run_cli("finetune", tiny_dir(), "--data", text_file, "--out", tmp_path / "o", "--steps", "2", "--loss", "kd")
    assert_one_line_error(proc, "no teacher for distillation")
    proc = run_cli("finetune", tiny_dir(), "--data", text_file, "--out", tmp_path / "o", "--steps", "2",
                   "--loss", "kd", "--teacher", tmp_path / "nowhere")
    assert_one_line_error(proc, "model path not found")
    assert not (tmp_path / "o").exists()
    with pytest.raises(AmpPruneError, match="no teacher"):
        resolve_teacher(str(tmp_path), None)


def test_mismatched_teacher_vocabulary_is_a_one_line_error(pruned, text_file, tmp_path):
    _, student = pruned
    cfg = CONFIGS["llama_gqa"]()
    cfg.vocab_size += 8
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    proc = run_cli("finetune", student, "--data", text_file, "--out", tmp_path / "o", "--steps", "2",
                   "--loss", "kd", "--teacher", other, "--seq-len", "32")
    assert_one_line_error(proc, "vocabulary")
    assert not (tmp_path / "o").exists()


def test_teacher_with_lm_loss_is_refused():
    with pytest.raises(AmpPruneError, match="--teacher is only used"):
        FinetuneConfig(model="m", data="d", loss="lm", teacher="t").validate()
    with pytest.raises(AmpPruneError, match="--temperature"):
        FinetuneConfig(model="m", data="d", loss="kd", temperature=0).validate()


def test_heldout_kl_is_zero_for_the_teacher_itself(pruned):
    src, _ = pruned
    from amp_prune.recover.data import to_train_batches
    model = AutoModelForCausalLM.from_pretrained(src)
    ex = [(list(range(4, 20)), list(range(4, 20))), (list(range(5, 15)), list(range(5, 15)))]
    _, kl = heldout(model, model, to_train_batches(ex, 2, 0), torch.device("cpu"))
    assert kl == pytest.approx(0, abs=1e-6)
