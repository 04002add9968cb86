"""`amp-prune eval` and `--eval`: perplexity, lm-eval accuracy on a model in memory, parsing, tables, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cli import TINY, assert_one_line_error, run_cli
from tiny import char_tokenizer, tiny_model

from amp_prune.arch import get_spec
from amp_prune.cli import main
from amp_prune.errors import AmpPruneError
from amp_prune.eval.harness import average5, evaluate_model, parse_results, parse_tasks, split_eval_spec
from amp_prune.eval.perplexity import wikitext2_perplexity
from amp_prune.report import format_results, format_side_by_side

TEST_DATA = Path(__file__).parents[1] / "data"  # the first 100 PIQA validation items (see tests/data/NOTICE)
CPU = torch.device("cpu")
ROWS = ["", " = Valkyria Chronicles III = ", "", " Senjo no Valkyria 3 : Unrecorded Chronicles is a tactical role "
        "playing video game developed by Sega and Media.Vision for the PlayStation Portable . ", "",
        " The game began development in 2010 , carrying over a large portion of the work done on Valkyria "
        "Chronicles II . "]


@pytest.fixture
def wiki_dir(tmp_path):
    d = tmp_path / "data"
    (d / "wikitext2").mkdir(parents=True)
    (d / "wikitext2/wikitext-2-raw-v1.test.rows.json").write_text(json.dumps(ROWS))
    return d


@torch.no_grad()
def test_perplexity_equals_a_direct_computation(wiki_dir):
    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    got = wikitext2_perplexity(model, tok, get_spec("llama"), CPU, data_dir=str(wiki_dir), seq_len=48,
                               batch_size=3, progress=False)
    ids = torch.tensor(tok("\n\n".join(ROWS), add_special_tokens=False)["input_ids"])
    n = ids.numel() // 48
    losses = [model(input_ids=ids[i * 48:(i + 1) * 48][None], labels=ids[i * 48:(i + 1) * 48][None]).loss
              for i in range(n)]
    assert got["windows"] == n > 3 and got["seq_len"] == 48
    assert got["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert "joined with '\\n\\n'" in got["protocol"] and f"{n} non-overlapping windows of 48" in got["protocol"]


def bos_char_tokenizer():
    """The character tokenizer, adding its BOS ``<s>`` (id 1) in front of every text, as Gemma's does."""
    from tokenizers import processors
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@torch.no_grad()
def test_perplexity_windows_start_with_bos_when_the_tokenizer_adds_one(wiki_dir):
    model, tok = tiny_model("gemma3_text"), bos_char_tokenizer()
    assert tok("ab")["input_ids"] == [1] + char_tokenizer()("ab")["input_ids"]
    got = wikitext2_perplexity(model, tok, get_spec("gemma3_text"), CPU, data_dir=str(wiki_dir), seq_len=48,
                               batch_size=3, progress=False)
    text = torch.tensor(tok("\n\n".join(ROWS), add_special_tokens=False)["input_ids"])
    n = text.numel() // 47
    windows = [torch.cat([torch.tensor([1]), text[i * 47:(i + 1) * 47]]) for i in range(n)]  # BOS + 47 text tokens
    losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert got["windows"] == n and got["bos"] is True
    assert got["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert "each a BOS (the tokenizer adds one by default) and 47 text tokens" in got["protocol"]
    plain = wikitext2_perplexity(model, char_tokenizer(), get_spec("gemma3_text"), CPU, data_dir=str(wiki_dir),
                                 seq_len=48, progress=False)
    assert plain["bos"] is False and "no BOS" in plain["protocol"] and plain["ppl"] != got["ppl"]


def test_perplexity_window_defaults_to_the_model_maximum(wiki_dir):
    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    model.config.max_position_embeddings = 64
    res = wikitext2_perplexity(model, tok, get_spec("llama"), CPU, data_dir=str(wiki_dir), progress=False)
    assert res["seq_len"] == 64
    with pytest.raises(AmpPruneError, match="longer than the model's maximum 64"):
        wikitext2_perplexity(model, tok, get_spec("llama"), CPU, data_dir=str(wiki_dir), seq_len=128, progress=False)
    with pytest.raises(AmpPruneError, match="expected .*wikitext-2-raw-v1.test.rows.json"):
        wikitext2_perplexity(model, tok, get_spec("llama"), CPU, data_dir=str(wiki_dir / "x"), progress=False)


@torch.no_grad()
def direct_piqa(model, tok, n):
    """lm-eval's multiple-choice scoring by hand: sum log p(" " + choice | prompt); acc_norm divides it by the
    choice's length in characters (without the target delimiter)."""
    docs = [json.loads(x) for x in (TEST_DATA / "piqa/valid.jsonl").read_text().splitlines()[:n]]
    labels = [int(x) for x in (TEST_DATA / "piqa/valid-labels.lst").read_text().split()[:n]]
    acc = acc_norm = 0
    for doc, gold in zip(docs, labels):
        ctx = tok.encode(f"Question: {doc['goal']}\nAnswer:", add_special_tokens=False)
        scores = []
        for choice in (doc["sol1"], doc["sol2"]):
            cont = tok.encode(" " + choice, add_special_tokens=False)
            # like lm-eval, keep the last max_length + 1 tokens when the pair is too long (left truncation)
            ids = torch.tensor([(ctx + cont)[-(model.config.max_position_embeddings + 1):]])
            logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
            end = ids.shape[1] - 1
            ll = logp[torch.arange(end - len(cont), end), torch.tensor(cont)].sum().item()
            scores.append((ll, ll / len(choice)))
        acc += max(range(2), key=lambda i: scores[i][0]) == gold
        acc_norm += max(range(2), key=lambda i: scores[i][1]) == gold
    return acc / n, acc_norm / n


def test_lm_eval_on_a_model_in_memory_matches_a_direct_computation():
    model, tok = tiny_model("llama_gqa", seed=3), char_tokenizer()
    res = evaluate_model(model, tok, tasks=["piqa"], data_dir=str(TEST_DATA), limit=12, batch_size=4, progress=False)
    acc, acc_norm = direct_piqa(model, tok, 12)
    row = res["tasks"]["piqa"]
    assert row["n"] == 12
    assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    assert res["avg5"] is None and res["settings"]["limit"] == 12 and "local copies" in res["settings"]["data"]
    assert model.training is False


RAW = {"results": {
    "piqa": {"alias": "piqa", "acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.72, "acc_norm_stderr,none": 0.01},
    "hellaswag": {"acc,none": 0.4, "acc_norm,none": 0.5}, "winogrande": {"acc,none": 0.55},
    "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.58}, "arc_challenge": {"acc,none": 0.3, "acc_norm,none": 0.32}},
    "n-samples": {"piqa": {"original": 1838, "effective": 100}}}


def test_parse_results_average_and_tables():
    tasks = parse_results(RAW)
    assert tasks["piqa"] == {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.72, "acc_norm_stderr": 0.01, "n": 100}
    assert tasks["winogrande"] == {"acc": 0.55, "n": 0}
    assert average5(tasks) == pytest.approx((0.72 + 0.5 + 0.55 + 0.58 + 0.32) / 5)
    assert average5(tasks, "acc") == pytest.approx((0.7 + 0.4 + 0.55 + 0.6 + 0.3) / 5)
    assert average5({k: v for k, v in tasks.items() if k != "hellaswag"}) is None
    res = {"tasks": tasks, "avg5": average5(tasks), "avg5_acc": average5(tasks, "acc"),
           "settings": {"limit": 100}, "wikitext2": {"ppl": 21.6, "windows": 3, "seq_len": 2048}}
    text = format_results(res)
    assert "piqa" in text and "70.00" in text and "72.00" in text and "53.40" in text and "51.00" in text
    assert "WikiText-2 perplexity 21.60" in text and "first 100 examples" in text
    pruned = {**res, "tasks": {**tasks, "piqa": {"acc": 0.6, "acc_norm": 0.62}}, "avg5": res["avg5"] - 0.02,
              "wikitext2": {"ppl": 30.0}}
    side = format_side_by_side(res, pruned)
    assert "piqa acc_norm" in side and "-10.00" in side and "-2.00" in side and "+8.40" in side


def test_task_spec_parsing():
    assert parse_tasks("piqa, arc_easy,,piqa") == ["piqa", "arc_easy"]
    assert parse_tasks("five") == ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]
    assert split_eval_spec("five,wikitext2") == (parse_tasks("five"), "wikitext2")
    assert split_eval_spec("wikitext2") == ([], "wikitext2")
    with pytest.raises(AmpPruneError, match="no task names"):
        split_eval_spec(" , ")


def test_eval_command_writes_results(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_dir()), "--tasks", "piqa", "--limit", "4", "--data-dir", str(TEST_DATA),
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "results written to" in printed
    res = json.loads(out.read_text())
    assert res["tasks"]["piqa"]["n"] == 4 and 0 <= res["tasks"]["piqa"]["acc"] <= 1


@pytest.mark.parametrize("args,match", [
    (["--tasks", "mmlu"], "unknown task 'mmlu' for --data-dir: available are piqa"),
    (["--tasks", "winogrande"], "expected"),
    (["--limit", "0", "--tasks", "piqa"], "--limit must be a positive"),
    (["--tasks", "", "--out", "OUT"], "nothing to evaluate"),
])
def test_eval_command_errors(tiny_dir, tmp_path, args, match):
    args = [str(tmp_path / "r.json") if a == "OUT" else a for a in args]
    proc = run_cli("eval", tiny_dir(), "--data-dir", TEST_DATA, "--no-progress", *args)
    assert_one_line_error(proc, match)
    assert not (tmp_path / "r.json").exists()


def test_eval_command_refuses_to_overwrite_results(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    proc = run_cli("eval", tiny_dir(), "--tasks", "piqa", "--data-dir", TEST_DATA, "--out", out)
    assert_one_line_error(proc, "already exists; pass --overwrite")
    assert out.read_text() == "{}"


def test_prune_with_eval_writes_side_by_side(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main([str(tiny_dir()), "--ratio", "0.3", "--out", str(out), *TINY, "--eval", "piqa",
                 "--eval-limit", "4", "--data-dir", str(TEST_DATA)]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned" in printed and "piqa acc_norm" in printed
    ev = json.loads((out / "eval.json").read_text())
    assert ev["dense"]["tasks"]["piqa"]["n"] == ev["pruned"]["tasks"]["piqa"]["n"] == 4
    assert json.loads((out / "run.json").read_text())["summary"]["eval"] == ev
    card = (out / "README.md").read_text()
    assert "## Evaluation (dense vs pruned, same settings)" in card and "| piqa acc_norm |" in card


def test_prune_eval_checks_data_before_pruning(tiny_dir, tmp_path):
    proc = run_cli(tiny_dir(), "--out", tmp_path / "o", "--eval", "five", "--data-dir", TEST_DATA, *TINY)
    assert_one_line_error(proc, "missing data file for task 'hellaswag'")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_piqa_is_above_chance(smollm2_dir):
    from amp_prune.io.load import load_model
    lm = load_model(str(smollm2_dir), device="cpu")
    res = evaluate_model(lm.model, lm.tokenizer, tasks=["piqa"], spec=lm.spec, data_dir=str(TEST_DATA), limit=100,
                         batch_size=16, progress=False)
    row = res["tasks"]["piqa"]
    assert row["n"] == 100
    # SmolLM2-135M scores ~0.68 on PIQA; chance is 0.5 and the standard error at n=100 is ~0.05
    assert 0.58 <= row["acc"] <= 0.85 and 0.58 <= row["acc_norm"] <= 0.85
