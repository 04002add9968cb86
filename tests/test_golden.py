"""The stage-per-folder move changed no result: plans, removed blocks and exported logits equal the goldens.

The goldens in tests/data/golden were recorded on the code before the move (commit 62b4c98),
with tests/golden_cases.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from golden_cases import CALIB, CASES, GOLDEN_DIR, run_case, tiny_dir


def _compare(got: dict, want: dict) -> None:
    for key in ("layers", "removed_layers", "steps", "config"):
        assert got[key] == want[key], key
    assert got["logits"]["argmax"] == want["logits"]["argmax"]
    # fp32 logits differ across CPUs by more than 1e-5: the unchanged code of 085b78f gave 4.05e-5 on a SmolLM2 logit of
    # 0.39 on an AVX512 machine (the goldens were recorded on another); a result change moves them far more
    for key in ("head", "logsumexp"):
        torch.testing.assert_close(torch.tensor(got["logits"][key]), torch.tensor(want["logits"][key]),
                                   atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES["tiny"]))
def test_tiny_model_results_are_unchanged(name, tmp_path):
    want = json.loads((GOLDEN_DIR / "tiny.json").read_text())[name]
    _compare(run_case(tiny_dir(tmp_path), CASES["tiny"][name], tmp_path / name), want)


def _assert_tie_swap(scores: torch.Tensor, only_got: set[int], only_want: set[int]) -> None:
    """The removed channels differ by at most two swaps, each between channels whose scores agree to 1e-5."""
    assert len(only_got) == len(only_want) <= 2, (only_got, only_want)
    for g, w in zip(sorted(only_got, key=lambda j: scores[j]), sorted(only_want, key=lambda j: scores[j])):
        assert abs(scores[g] - scores[w]) <= 1e-5 * abs(scores[w]), (g, w, scores[g].item(), scores[w].item())


def _channel_scores(model_dir, case: dict) -> Callable[[int], torch.Tensor]:
    """AMP channel scores of every block on the case's calibration batches, computed once when first asked."""
    from amp_prune import PruneConfig, load_model
    from amp_prune.pipeline import calibrate
    from amp_prune.width.criteria import ScoreContext, get_criterion

    memo: list = []

    def of(layer: int) -> torch.Tensor:
        if not memo:
            cfg = PruneConfig.from_flat(model=str(model_dir), **CALIB, **case)
            lm = load_model(str(model_dir), device="cpu")
            calib, _ = calibrate(cfg, lm.tokenizer)
            memo.extend(get_criterion("amp")(lm.model, lm.spec, calib, ScoreContext(torch.device("cpu"),
                                                                                      progress=False)))
        return memo[layer].channels
    return of


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES["smollm2"]))
def test_smollm2_results_are_unchanged(name, smollm2_dir, tmp_path):
    """As the tiny cases; a width plan may swap channels whose AMP scores tie to fp32 precision (one channel of
    block 7 in width_heads flips between CPUs, with 085b78f's code as with later code)."""
    want = json.loads((GOLDEN_DIR / "smollm2.json").read_text())[name]
    case = CASES["smollm2"][name]
    got = run_case(smollm2_dir, case, tmp_path / name)
    if case["method"] == "width" and got["layers"] != want["layers"]:
        scores = _channel_scores(smollm2_dir, case)
        for a, b in zip(got["layers"], want["layers"]):
            if a != b:
                assert (a["heads"], a["kv_heads"]) == (b["heads"], b["kv_heads"]), a["layer"]
                _assert_tie_swap(scores(a["layer"]), set(a["channels"]) - set(b["channels"]),
                                 set(b["channels"]) - set(a["channels"]))
        # the plan differs by ties only: the golden plan, replayed, must still give the golden export
        plan = json.loads((tmp_path / name / "out" / "pruning_plan.json").read_text())
        (tmp_path / "golden_plan.json").write_text(json.dumps({**plan, "layers": want["layers"]}))
        got = run_case(smollm2_dir, {**case, "plan": str(tmp_path / "golden_plan.json")}, tmp_path / "replay")
    _compare(got, want)
