"""Offline lm-eval tasks: the requests built from the local files equal those of the stock task configs.

Each case writes a few records in the *original local format* (as in shared/data) to a temp data
dir, and the *same records in the schema of the HF dataset* the stock lm-eval task downloads. The
stock side is lm-eval's own YAML config, fed those HF records without any amp-prune code; the
local side is ``build_local_task``. Their requests (context, continuation) must be equal.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import datasets
import lm_eval.tasks
import pytest
from conftest import SHARED_DATA
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from amp_prune.errors import AmpPruneError
from amp_prune.eval.local_tasks import SEVEN, TASKS, build_local_task, check_files, config_with_records, stock_config

PIQA = [{"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
                 "will also need to supply it with a water bottle and a food dish.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                 "you will also need to supply it with a water bottle and a food dish."},
        {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "}]
ARC_C = {"id": "Mercury_7175875", "question": {
    "stem": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely "
            "effect of this increase in rotation?",
    "choices": [{"text": "Planetary density will decrease.", "label": "A"},
                {"text": "Planetary years will become longer.", "label": "B"},
                {"text": "Planetary days will become shorter.", "label": "C"},
                {"text": "Planetary gravity will become stronger.", "label": "D"}]}, "answerKey": "C"}
ARC_DIGITS = {"id": "NYSEDREGENTS_2015_4_8", "question": {"stem": "Which object is a liquid?", "choices": [
    {"text": "a rock", "label": "1"}, {"text": "milk", "label": "2"}, {"text": "a penny", "label": "3"}]},
    "answerKey": "2"}
WINO = [{"qID": "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2", "option1": "Sarah", "option2": "Maria", "answer": "2",
         "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases."},
        {"qID": "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-1", "option1": "Sarah", "option2": "Maria", "answer": "1",
         "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases."}]
BOOLQ = [{"question": "does ethanol take more energy make that produces", "title": "Ethanol fuel", "answer": False,
          "passage": "All biomass goes through at least some of these steps: it needs to be grown, collected, dried, "
                     "fermented, distilled, and burned."},
         {"question": "is house tax and property tax are same", "title": "Property tax", "answer": True,
          "passage": "Property tax or 'house tax' is a local tax on buildings, along with appurtenant land."}]
OBQA = {"id": "8-343", "question": {
    "stem": "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
            "After looking over their budget and expenses, they decide the best way to save money is to",
    "choices": [{"text": "make more phone calls", "label": "A"}, {"text": "quit eating lunch out", "label": "B"},
                {"text": "buy less with monopoly money", "label": "C"},
                {"text": "have lunch with friends", "label": "D"}]}, "answerKey": "B"}
HELLA_LINES = ["Roof shingle removal: A man is sitting on a roof. he", "3", "is using wrap to wrap a pair of skis.",
               "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof.",
               "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady", "3",
               "swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
               "stands and lifts the weight over her head."]


def _arc_hf(x):  # written out by hand: the allenai/ai2_arc (and openbookqa) record layout
    return {"text": [c["text"] for c in x["question"]["choices"]], "label": [c["label"] for c in x["question"]["choices"]]}


# the same records as the HF datasets that stock lm-eval downloads
HF = {
    "piqa": [{**PIQA[0], "label": 0}, {**PIQA[1], "label": 1}],
    "arc_challenge": [{"id": x["id"], "question": x["question"]["stem"], "choices": _arc_hf(x), "answerKey": x["answerKey"]}
                      for x in (ARC_C, ARC_DIGITS)],
    "arc_easy": [{"id": x["id"], "question": x["question"]["stem"], "choices": _arc_hf(x), "answerKey": x["answerKey"]}
                 for x in (ARC_C, ARC_DIGITS)],
    "winogrande": [{k: x[k] for k in ("sentence", "option1", "option2", "answer")} for x in WINO],
    "boolq": [{"question": BOOLQ[0]["question"], "passage": BOOLQ[0]["passage"], "idx": 0, "label": 0},
              {"question": BOOLQ[1]["question"], "passage": BOOLQ[1]["passage"], "idx": 1, "label": 1}],
    "openbookqa": [{"id": OBQA["id"], "question_stem": OBQA["question"]["stem"], "choices": _arc_hf(OBQA),
                    "answerKey": "B"}],
    "hellaswag": [  # Rowan/hellaswag validation items 0 and 1
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": HELLA_LINES[2:6], "label": "3"},
        {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
         "ctx_b": "the lady", "endings": HELLA_LINES[8:12], "label": "3"}],
}


def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    """The shared/data layout, holding the records above in their original local formats."""
    d = tmp_path / "data"
    _jsonl(d / "piqa/valid.jsonl", PIQA)
    (d / "piqa/valid-labels.lst").write_text("0\n1\n")
    _jsonl(d / "arc/ARC-Challenge-Test.jsonl", [ARC_C, ARC_DIGITS])
    (d / "arc/ARC-Easy-Test.hf.json").write_text(json.dumps(HF["arc_easy"]))
    _jsonl(d / "winogrande/dev.jsonl", WINO)
    _jsonl(d / "boolq/dev.jsonl", BOOLQ)
    _jsonl(d / "openbookqa/test.jsonl", [OBQA])
    (d / "hellaswag").mkdir()
    (d / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress("\n".join(HELLA_LINES).encode()))
    return d


def stock_task(name: str, records: list[dict]) -> ConfigurableTask:
    """lm-eval's YAML config as shipped, with its dataset replaced by ``records`` (no amp-prune code)."""
    path = Path(lm_eval.tasks.__file__).parent / TASKS[name].stock_yaml
    cfg = load_yaml(path, resolve_func=True)
    split = cfg.get("test_split") or cfg["validation_split"]

    def dataset(**_):
        return datasets.DatasetDict({s: datasets.Dataset.from_list(records)
                                     for s in {split, cfg["training_split"]} if s})
    return ConfigurableTask(config={**cfg, "custom_dataset": dataset})


def requests(task) -> list[tuple]:
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.args) for inst in task.instances]


def golds(task) -> list[int]:
    return [task.doc_to_target(d) for d in task.eval_docs]


@pytest.mark.parametrize("name", [n for n in SEVEN if n != "hellaswag"])
def test_local_requests_equal_stock_requests(name, data_dir):
    local, stock = build_local_task(name, data_dir), stock_task(name, HF[name])
    assert len(local.eval_docs) == len(HF[name])
    assert requests(local) == requests(stock)
    assert golds(local) == golds(stock)
    assert local.config.target_delimiter == stock.config.target_delimiter
    assert local.config.metric_list == stock.config.metric_list


def test_arc_digit_labels_map_to_the_right_choice(data_dir):
    task = build_local_task("arc_challenge", data_dir)
    assert golds(task) == [2, 1]  # "C" of A-D, "2" of 1-3


def test_hellaswag_differs_from_stock_only_in_the_ctx_b_capital(data_dir):
    """The klosax file keeps ``ctx_b`` lower-case where lm-eval capitalizes it; choices and gold are equal."""
    local, stock = requests(build_local_task("hellaswag", data_dir)), requests(stock_task("hellaswag", HF["hellaswag"]))
    assert len(local) == len(stock) == 8
    for (di, ci, (lctx, lcont)), (dj, cj, (sctx, scont)) in zip(local, stock):
        assert (di, ci, lcont) == (dj, cj, scont)
        assert lctx != sctx and lctx.lower() == sctx.lower()
    assert stock[0][2][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert golds(build_local_task("hellaswag", data_dir)) == [3, 3]


def test_only_the_data_source_differs_from_the_stock_config():
    for name in SEVEN:
        stock = stock_config(name)
        local = config_with_records(name, [], processed=name == "hellaswag")
        changed = {k for k in set(stock) | set(local) if stock.get(k) != local.get(k)}
        allowed = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                   "custom_dataset", "tag", "group", "process_docs"}
        assert changed <= allowed, (name, changed - allowed)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "output_type"):
            assert local.get(key) == stock.get(key)


def test_unknown_task_lists_the_available_ones(data_dir):
    with pytest.raises(AmpPruneError, match="unknown task 'mmlu'.*piqa.*openbookqa"):
        build_local_task("mmlu", data_dir)


def test_missing_file_names_the_expected_path(data_dir):
    (data_dir / "winogrande/dev.jsonl").unlink()
    with pytest.raises(AmpPruneError, match=r"expected .*winogrande/dev\.jsonl"):
        check_files("winogrande", data_dir)
    with pytest.raises(AmpPruneError, match="not a directory"):
        check_files("piqa", data_dir / "nope")


def test_broken_files_get_one_line_errors(data_dir):
    (data_dir / "piqa/valid-labels.lst").write_text("0\n")
    with pytest.raises(AmpPruneError, match="1 labels for 2 items"):
        build_local_task("piqa", data_dir)
    (data_dir / "boolq/dev.jsonl").write_text('{"question": "x"\n')
    with pytest.raises(AmpPruneError, match=r"dev\.jsonl:1: not valid JSON"):
        build_local_task("boolq", data_dir)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs a copy of shared/data next to the repository")
def test_the_shared_data_files_load_completely():
    from amp_prune.eval.local_tasks import load_records
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
              "boolq": 3270, "openbookqa": 500}
    for name, n in counts.items():
        assert len(load_records(name, SHARED_DATA)) == n, name
