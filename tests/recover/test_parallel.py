"""Data-parallel recovery: 2 CPU processes (gloo, through torchrun + accelerate) equal one process at the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_prune.errors import AmpPruneError
from amp_prune.recover.data import IGNORE, TrainBatch
from amp_prune.recover.parallel import Parallel

ARGS = ["--steps", "3", "--seq-len", "32", "--batch-size", "4", "--eval-samples", "2", "--no-progress", "--loss", "lm",
        "--lora-dropout", "0", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_at_the_same_global_batch(tiny_dir, tmp_path):
    src = tiny_dir()
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog {'again ' * (i % 5)}"
                                for i in range(40)))  # rows of unequal length: the token weighting matters
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              "-m", "amp_prune", "finetune", str(src), "--data", str(data), "--out", str(ddp), *ARGS]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("LoRA recovery: 3 steps") == 1  # only the main process reports and exports
    proc = subprocess.run([sys.executable, "-m", "amp_prune", "finetune", str(src), "--data", str(data), "--out",
                           str(one), *ARGS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "run.json").read_text()) for d in (ddp, one))
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    assert a["summary"]["ppl_after"] == pytest.approx(b["summary"]["ppl_after"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(ddp)
    assert not any("lora" in k for k in merged.state_dict())


def test_shards_and_their_weights():
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, IGNORE, IGNORE], [1, 2, 3, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    b = TrainBatch(labels.clamp(min=0), (labels != IGNORE).long(), labels)
    # labelled next-token positions per row: 3, 1, 2, 0 -> k = 6; rank 0 has rows 0, 2 (5), rank 1 rows 1, 3 (1)
    part0, w0 = Parallel(world=2, rank=0).shard(b)
    part1, w1 = Parallel(world=2, rank=1).shard(b)
    assert part0.labels.tolist() == labels[[0, 2]].tolist() and part1.labels.tolist() == labels[[1, 3]].tolist()
    assert w0 == pytest.approx(2 * 5 / 6) and w1 == pytest.approx(2 * 1 / 6) and (w0 + w1) / 2 == pytest.approx(1.0)
    assert Parallel().shard(b) == (b, 1.0)
    with pytest.raises(AmpPruneError, match="must be a multiple of the 2 launched processes"):
        Parallel(world=2).check(3)
