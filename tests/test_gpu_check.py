"""The prepared GPU check runs end to end at the tiny shape on CPU, so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_writes_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--shape", "tiny", "--num-samples", "8",
                           "--seq-len", "128", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    for phase in ("build", "calibration batches", "plain forward", "scoring + split search + one-pass refit",
                  "surgery", "export + reload check"):
        assert res["phases"][phase]["wall_s"] > 0 and res["phases"][phase]["peak_rss_mb"] > 0, phase
    assert res["export"]["ok"] and res["export"]["class"] == "LlamaForCausalLM"
    assert 0.25 < res["achieved_ratio"] < 0.35 and res["scoring_over_forward"] > 0
    assert "vllm" not in res  # no GPU: the vLLM part is skipped, not faked
