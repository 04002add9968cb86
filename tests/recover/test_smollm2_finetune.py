"""Real model: a short LoRA recovery of SmolLM2 pruned at 0.3 lowers held-out perplexity."""

from __future__ import annotations

import pytest

from amp_prune import PruneConfig, prune
from amp_prune.config import FinetuneConfig
from amp_prune.recover.finetune import finetune

pytestmark = pytest.mark.slow


def test_short_recovery_lowers_heldout_perplexity(smollm2_dir, tmp_path):
    pruned = prune(PruneConfig.from_flat(model=str(smollm2_dir), ratio=0.3, out=str(tmp_path / "p"), num_samples=16,
                               seq_len=128, eval_samples=0, progress=False))
    s = finetune(FinetuneConfig(model=pruned.out, data="builtin:c4", out=str(tmp_path / "r"), steps=30, seq_len=128,
                                batch_size=4, eval_samples=16, lr=5e-4, progress=False, device="cpu"))
    # the 16 held-out chunks are split off before training and never trained on
    assert s["ppl_after"] < 0.8 * s["ppl_before"], (s["ppl_before"], s["ppl_after"])
    assert s["export_max_abs_diff"] <= 1e-4
