"""The command line: a tiny end-to-end run and every bad input getting a one-line error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from amp_prune.cli import main

TINY = ["--num-samples", "4", "--seq-len", "32", "--eval-samples", "2", "--batch-size", "2", "--no-progress"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "amp_prune", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line_error(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("amp-prune: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and match in lines[0]


def test_end_to_end_on_tiny_model(tiny_dir, tmp_path, capsys):
    src = tiny_dir("qwen2")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "pruned"
    assert main([str(src), "--ratio", "0.3", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert re.search(r"removed \d+\.\d\d% of all parameters \(target 30%\)", text) and "logits match" in text
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pruning_plan.json", "run.json", "README.md"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["ratio"] == 0.3 and run["seed"] == 0 and "transformers" in run["versions"]
    assert {"scoring_s", "surgery_s", "export_s", "total_s"} <= set(run["timings"])
    assert run["export_check"]["max_abs_diff"] <= run["export_check"]["tolerance"]
    assert abs(run["summary"]["achieved_ratio"] - 0.3) < 0.02
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == run["summary"]["channels_after"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input is never modified
    # replaying the plan on the original gives the same weights
    out2 = tmp_path / "replayed"
    assert main([str(src), "--plan", str(out / "pruning_plan.json"), "--out", str(out2), *TINY]) == 0
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out2).state_dict()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("ratio", ["0", "-0.2", "1", "1.5"])
def test_bad_ratio(tiny_dir, tmp_path, ratio):
    proc = run_cli(tiny_dir(), "--ratio", ratio, "--out", tmp_path / "o")
    assert_one_line_error(proc, "--ratio must be strictly between 0 and 1")
    assert not (tmp_path / "o").exists()


def test_missing_model_path(tmp_path):
    proc = run_cli(tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(proc, "model path not found")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_id(tmp_path):
    proc = run_cli("no-such-org/no-such-model-xyz", "--out", tmp_path / "o")
    assert_one_line_error(proc, "cannot load 'no-such-org/no-such-model-xyz' from the Hugging Face hub")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(d)
    proc = run_cli(d, "--out", tmp_path / "o")
    assert_one_line_error(proc, "unsupported architecture 'gpt2'")
    assert "gemma3_text, glm, granite, helium, llama, mistral, olmo2, phi3, qwen2, qwen3, smollm3" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,match", [("", "has no text"), ("tiny text", "is too short")])
def test_empty_or_short_calibration(tiny_dir, tmp_path, content, match):
    f = tmp_path / "calib.txt"
    f.write_text(content)
    proc = run_cli(tiny_dir(), "--calib", f, "--out", tmp_path / "o", "--num-samples", "8")
    assert_one_line_error(proc, match)
    assert not (tmp_path / "o").exists()


def test_existing_output_dir(tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = run_cli(tiny_dir(), "--out", out)
    assert_one_line_error(proc, "already exists; pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_output_over_input_refused(tiny_dir):
    src = tiny_dir()
    proc = run_cli(src, "--out", src, "--overwrite", *TINY)
    assert_one_line_error(proc, "would overwrite the input model")
    assert (src / "config.json").is_file() and not (src / "pruning_plan.json").exists()
    assert not [p for p in src.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("layers", ["0", "-2", "3", "9"])
def test_bad_layer_count(tiny_dir, tmp_path, layers):
    proc = run_cli(tiny_dir(), "--method", "cka", "--layers", layers, "--out", tmp_path / "o", *TINY)
    match = "--layers must be" if int(layers) > 0 else "--layers must be a positive number"
    assert_one_line_error(proc, match)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_depth_end_to_end_writes_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "d"
    assert main([str(tiny_dir("qwen3")), "--method", "cka", "--layers", "1", "--out", str(out), "--depth-cache", "disk",
                 *TINY]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "step  1: drop [" in text and "decoder blocks" in text
    # the cache estimate comes before the search: 4 sequences of <= 32 tokens, 3 blocks + 1, hidden 64, fp32
    assert "depth search: 4 sequences" in captured.err and "prefix cache is about" in captured.err
    assert "kept on disk" in captured.err
    assert (out / "layer_scores.png").stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["representation"] == "pooled" and run["summary"]["layers_after"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("command", [["amp_prune"], ["amp_prune", "eval"], ["amp_prune", "finetune"],
                                     ["bias_probe.cli"]])
def test_every_command_answers_help(command):
    """``-h`` of every command and subcommand prints its usage and exits 0 (bias-probe's once crashed on a '%')."""
    module, *sub = command
    code = ("import sys; from bias_probe.cli import main; sys.exit(main())" if module == "bias_probe.cli" else None)
    argv = [sys.executable, "-c", code, "-h"] if code else [sys.executable, "-m", module, *sub, "-h"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "Traceback" not in proc.stderr


def test_prune_help_is_grouped_by_stage():
    proc = subprocess.run([sys.executable, "-m", "amp_prune", "-h"], capture_output=True, text=True, timeout=120)
    body = proc.stdout.split("\nMODEL: ")[0]  # the epilog may wrap onto a line that ends in ':'
    groups = [ln[:-1] for ln in body.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
    assert groups == ["positional arguments", "options", "model and output", "calibration",
                      "width (--method width / hybrid)", "depth (--method cka / hybrid)",
                      "evaluation (dense and pruned, side by side)", "fairness (bias_probe on dense and pruned)",
                      "runtime", "recovery"], groups
    model_and_output = proc.stdout.split("model and output:")[1].split("calibration:")[0]
    assert all(f in model_and_output for f in ("--ratio ", "--ratio-of", "--out", "--method", "--plan", "--push-to-hub"))
