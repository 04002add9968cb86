"""Real model: CKA block dropping on SmolLM2-135M against random block drops."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_prune import PruneConfig, load_model, prune
from amp_prune.calib.data import build_batches
from amp_prune.eval.perplexity import perplexity
from amp_prune.depth.search import random_blocks
from amp_prune.surgery import remove_blocks

pytestmark = pytest.mark.slow
CFG = dict(num_samples=8, seq_len=128, eval_samples=16, batch_size=8, progress=False)


def test_cka_drop_6_beats_random_drops(smollm2_dir, tmp_path):
    out = tmp_path / "smol-cka6"
    res = prune(PruneConfig.from_flat(model=str(smollm2_dir), method="cka", layers=6, out=str(out), **CFG))
    s = res.summary
    assert s["layers_after"] == 24 and len(s["removed_layers"]) == 6
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 24
    assert (out / "layer_scores.png").is_file()
    lm = load_model(str(smollm2_dir), device="cpu")
    _, held = build_batches(lm.tokenizer, num_samples=CFG["num_samples"], seq_len=CFG["seq_len"],
                            eval_samples=CFG["eval_samples"])  # the same held-out chunks prune() used
    random_ppl = []
    for seed in range(4):
        m = load_model(str(smollm2_dir), device="cpu")
        remove_blocks(m.model, m.spec, random_blocks(30, 6, seed))
        random_ppl.append(perplexity(m.model, m.spec, held, torch.device("cpu")))
    assert s["ppl_after"] < statistics.mean(random_ppl), (s["ppl_after"], random_ppl, s["removed_layers"])
