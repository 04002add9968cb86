"""Hub conventions: the card's YAML metadata and --push-to-hub's errors (no network needed)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from test_cli import TINY

from amp_prune.cli import main
from amp_prune.io.hub import source_metadata
from amp_prune.io.load import ALIASES

KNOWN = {n: a.card for n, a in ALIASES.items()}


def test_source_metadata_for_a_hub_id_the_demo_and_a_local_card(tmp_path):
    assert source_metadata("meta-llama/Llama-3.1-8B", None, KNOWN) == {"base_model": "meta-llama/Llama-3.1-8B"}
    assert source_metadata("smollm2-135m", tmp_path, KNOWN) == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                 "license": "apache-2.0"}
    assert source_metadata("gemma3-270m", None, KNOWN) == {"base_model": "google/gemma-3-270m", "license": "gemma"}
    assert source_metadata(str(tmp_path), tmp_path, KNOWN) == {}  # a local dir without a card
    (tmp_path / "README.md").write_text("---\nlicense: mit\nbase_model: org/dense\n---\n# a model\n")
    assert source_metadata(str(tmp_path), tmp_path, KNOWN) == {"license": "mit", "base_model": "org/dense"}
    (tmp_path / "README.md").write_text("---\n: [not yaml\n---\n")
    assert source_metadata(str(tmp_path), tmp_path, KNOWN) == {}  # unreadable: skipped, never an error


def test_card_starts_with_hub_metadata_carried_from_the_source(tiny_dir, tmp_path):
    src = tiny_dir()
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny-dense\n---\n# tiny\n")
    out = tmp_path / "pruned"
    assert main([str(src), "--ratio", "0.3", "--out", str(out), *TINY]) == 0
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["base_model"] == "org/tiny-dense" and data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pruned", "amp-prune"} <= set(data["tags"])


@pytest.mark.parametrize("args, match", [
    (["--push-to-hub", "no spaces allowed/x"], "is not a hub repo id"),
    (["--push-to-hub", "justaname"], "has no namespace"),
    (["--private"], "--private applies to --push-to-hub only"),
    (["--push-to-hub", "me/x", "--finetune", "train.txt"], "would upload the model before --finetune recovers it"),
])
def test_bad_push_requests_fail_before_any_work(tiny_dir, tmp_path, capsys, args, match):
    src = tiny_dir()
    capsys.readouterr()
    assert main([str(src), "--out", str(tmp_path / "o"), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_push_offline_fails_in_one_line_after_the_export(tiny_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    src, out = tiny_dir(), tmp_path / "pruned"
    capsys.readouterr()
    code = main([str(src), "--ratio", "0.3", "--out", str(out), *TINY, "--push-to-hub", "me/tiny-amp30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"the export in {out} is complete, but the upload to me/tiny-amp30 failed" in err[0]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # the local export stands
