"""The stage-per-folder move changed no result: plans, removed blocks and exported logits equal the goldens.

The goldens in tests/data/golden were recorded on the code before the move (commit 62b4c98),
with tests/golden_cases.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from golden_cases import CASES, GOLDEN_DIR, run_case, tiny_dir


def _compare(got: dict, want: dict) -> None:
    for key in ("layers", "removed_layers", "steps", "config"):
        assert got[key] == want[key], key
    assert got["logits"]["argmax"] == want["logits"]["argmax"]
    for key in ("head", "logsumexp"):
        torch.testing.assert_close(torch.tensor(got["logits"][key]), torch.tensor(want["logits"][key]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES["tiny"]))
def test_tiny_model_results_are_unchanged(name, tmp_path):
    want = json.loads((GOLDEN_DIR / "tiny.json").read_text())[name]
    _compare(run_case(tiny_dir(tmp_path), CASES["tiny"][name], tmp_path / name), want)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES["smollm2"]))
def test_smollm2_results_are_unchanged(name, smollm2_dir, tmp_path):
    want = json.loads((GOLDEN_DIR / "smollm2.json").read_text())[name]
    _compare(run_case(smollm2_dir, CASES["smollm2"][name], tmp_path / name), want)
