"""LoRA recovery: merge identity, end-to-end runs, exact resume after an interruption, bad data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES
from test_cli import TINY, assert_one_line_error, run_cli
from tiny import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from amp_prune.arch import get_spec
from amp_prune.cli import main
from amp_prune.errors import AmpPruneError
from amp_prune.config import FinetuneConfig
from amp_prune.recover.finetune import finetune
from amp_prune.recover.data import IGNORE, _instruction_examples, load_examples

FT = dict(seq_len=32, batch_size=2, eval_samples=2, progress=False, device="cpu", loss="lm")  # no teacher


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog {i}" for i in range(40)))
    return f


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_base_plus_lora_delta(family):
    from peft import LoraConfig, get_peft_model
    base = tiny_model(family)
    spec = get_spec(base.config.model_type)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=spec.projection_names(),
                                                 init_lora_weights=False))
    lora_modules = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(lora_modules) == len(spec.projection_names()) * base.config.num_hidden_layers  # every projection
    expected = {}
    for name, m in lora_modules.items():
        key = name.removeprefix("base_model.model.") + ".weight"
        delta = (m.lora_B["default"].weight @ m.lora_A["default"].weight) * (8 / 4)
        expected[key] = ref[key] + delta
    merged = peft_model.merge_and_unload()
    sd = merged.state_dict()
    for key, want in expected.items():
        torch.testing.assert_close(sd[key], want, atol=1e-6, rtol=1e-5)
    assert not any("lora" in k for k in sd)


def test_instruction_labels_cover_the_response_only():
    tok = char_tokenizer()
    (ids, labels), = _instruction_examples([{"instruction": "Say hi", "input": "", "output": "hi"}], tok, 512)
    answer = [t for t in labels if t != IGNORE]
    assert answer == tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[: len(ids) - 3] == [IGNORE] * (len(ids) - 3)


def test_end_to_end_text(tiny_dir, text_file, tmp_path, capsys):
    src = tiny_dir("qwen2")
    out = tmp_path / "rec"
    assert main(["finetune", str(src), "--data", str(text_file), "--out", str(out), "--steps", "4",
                 "--seq-len", "32", "--batch-size", "2", "--eval-samples", "2", "--no-progress", "--loss", "lm"]) == 0
    assert "LoRA recovery: 4 steps (lm loss)" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert len(run["losses"]) == 4 and run["summary"]["data_kind"] == "text"
    assert (out / "README.md").read_text().count("LoRA") >= 1
    re = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in re.state_dict())
    assert not list(tmp_path.glob(".rec*"))  # no checkpoint or temp dir left behind


def test_end_to_end_instruction(tiny_dir, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Repeat {i}", "input": "x" if i % 2 else "", "output": f"{i} {i}"}
                                for i in range(12)]))
    s = finetune(FinetuneConfig(model=str(tiny_dir("llama_gqa")), data=str(data), out=str(tmp_path / "o"), steps=3,
                                **{**FT, "seq_len": 256}))
    assert s["data_kind"] == "instruction" and s["steps"] == 3


def test_interrupted_run_resumes_exactly(tiny_dir, text_file, tmp_path):
    src = str(tiny_dir("llama_gqa"))
    cfg = dict(model=src, data=str(text_file), steps=6, save_every=100, **FT)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(AmpPruneError, match="interrupted after step 3/6"):
        finetune(FinetuneConfig(out=str(tmp_path / "a"), **cfg), on_step=interrupt)
    assert (tmp_path / ".a.finetune-ckpt" / "state.pt").is_file() and not (tmp_path / "a").exists()
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "a"), **cfg))
    assert resumed["resumed_from"] == 3
    straight = finetune(FinetuneConfig(out=str(tmp_path / "b"), **cfg))
    assert straight["resumed_from"] == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert not (tmp_path / ".a.finetune-ckpt").exists()


def test_checkpoint_from_other_settings_is_refused(tiny_dir, text_file, tmp_path):
    src = str(tiny_dir("llama_gqa"))
    with pytest.raises(AmpPruneError):
        finetune(FinetuneConfig(model=src, data=str(text_file), out=str(tmp_path / "a"), steps=4, **FT),
                 on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None)
    with pytest.raises(AmpPruneError, match="other settings"):
        finetune(FinetuneConfig(model=src, data=str(text_file), out=str(tmp_path / "a"), steps=4, lr=1e-3, **FT))


@pytest.mark.parametrize("content,name,match", [
    ("", "empty.txt", "has no text"),
    ('[{"instruction": "a"}, {"instruction": "b", "output": "c"}]', "bad.json", "need both 'instruction' and 'output'"),
    ('{"text": "ok"}\n{broken', "broken.jsonl", "not valid JSON"),
    ("a few words only", "short.txt", "needs more than --eval-samples"),
])
def test_bad_data(tiny_dir, tmp_path, content, name, match):
    f = tmp_path / name
    f.write_text(content)
    proc = run_cli("finetune", tiny_dir(), "--data", f, "--out", tmp_path / "o", "--steps", "2", "--seq-len", "32",
                   "--loss", "lm")
    assert_one_line_error(proc, match)
    assert not (tmp_path / "o").exists()


def test_missing_data_file(tiny_dir, tmp_path):
    with pytest.raises(AmpPruneError, match="not found"):
        load_examples(str(tmp_path / "nope.txt"), char_tokenizer(), seq_len=32, seed=0)


def test_prune_then_finetune_chain(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "chain"
    assert main([str(tiny_dir("mistral")), "--ratio", "0.3", "--out", str(out), "--finetune", str(text_file),
                 "--finetune-steps", "2", "--finetune-loss", "kd", *TINY]) == 0
    text = capsys.readouterr().out
    assert "removed" in text and "LoRA recovery: 2 steps (kd loss)" in text and "KL to the teacher" in text
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["teacher"] == f"{tiny_dir('mistral')} (in memory)"
    assert run["config"]["teacher"] == str(tiny_dir("mistral"))
    assert (out / "config.json").is_file() and (tmp_path / "chain-pruned" / "pruning_plan.json").is_file()
