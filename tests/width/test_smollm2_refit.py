"""SmolLM2 at 0.3: the refit lowers held-out perplexity against no refit, on the same held-out text."""

from __future__ import annotations

import pytest

from amp_prune import PruneConfig, prune

pytestmark = pytest.mark.slow
SMALL = dict(num_samples=16, seq_len=128, eval_samples=16, batch_size=8, progress=False)


@pytest.mark.parametrize("split", ["uniform", "auto"])
def test_refit_beats_no_refit_on_held_out_text(smollm2_dir, split):
    runs = {refit: prune(PruneConfig.from_flat(model=str(smollm2_dir), ratio=0.3, attn_units=split, refit=refit,
                                               **SMALL), save=False).summary for refit in ("none", "onepass")}
    assert runs["none"]["ppl_before"] == pytest.approx(runs["onepass"]["ppl_before"])  # the same held-out chunks
    assert runs["onepass"]["ppl_after"] < runs["none"]["ppl_after"], runs
