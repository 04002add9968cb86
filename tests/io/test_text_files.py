"""User text in any common encoding: UTF-8 (BOM or not) and UTF-16 with a BOM are read alike; binary data and
undecodable bytes are refused in one line that names the file, before any model loads."""

from __future__ import annotations

import os

import pytest
import torch
from test_cli import TINY, assert_one_line_error, run_cli
from tiny import char_tokenizer

import amp_prune.pipeline as pipeline
from amp_prune import PruneConfig, prune
from amp_prune.calib.data import build_batches
from amp_prune.errors import AmpPruneError
from amp_prune.io.files import decode_text

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café {i}." for i in range(40))


def test_utf16_with_a_bom_gives_the_same_calibration_chunks_as_utf8(tmp_path):
    utf8, utf8_bom, utf16 = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    utf8.write_bytes(TEXT.encode("utf-8"))
    utf8_bom.write_bytes(TEXT.encode("utf-8-sig"))
    utf16.write_bytes(TEXT.encode("utf-16"))  # with its BOM, little-endian here
    assert utf16.read_bytes()[:2] == b"\xff\xfe"
    batches = [build_batches(char_tokenizer(), str(f), num_samples=8, seq_len=32, eval_samples=2)
               for f in (utf8, utf8_bom, utf16)]
    for calib, held in batches[1:]:
        for a, b in zip(calib + held, batches[0][0] + batches[0][1]):
            assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("kind, data, match", [
    ("utf16-no-bom", TEXT.encode("utf-16-le"), "binary data (a NUL byte at byte 1; UTF-16 without a byte-order mark"),
    ("random-200k", os.urandom(200_000) + b"\x00", "binary data"),
    ("binary-3k", bytes(range(256)) * 12, "binary data (a NUL byte at byte 0"),
    ("latin-1", ("é" * 10 + TEXT).encode("latin-1"), "not UTF-8 at byte 0"),
])
def test_binary_and_undecodable_files_are_refused_before_the_model_loads(tmp_path, tiny_dir, monkeypatch, kind, data,
                                                                         match):
    f = tmp_path / f"{kind}.txt"
    f.write_bytes(data)
    monkeypatch.setattr(pipeline, "load_placed", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(AmpPruneError) as err:
        prune(PruneConfig.from_flat(model=str(tiny_dir()), calib=str(f), out=str(tmp_path / "o")))
    msg = str(err.value)
    assert msg.startswith(f"calibration file {f}: ") and match in msg and "save it as UTF-8" in msg, msg
    assert "\n" not in msg and not (tmp_path / "o").exists()


def test_random_bytes_without_a_nul_are_refused_as_not_utf8():
    data = bytes(b for b in os.urandom(50_000) if b)  # no NUL byte: the UTF-8 decode itself fails
    with pytest.raises(AmpPruneError, match=r"^x: not UTF-8 at byte \d+; save it as UTF-8"):
        decode_text(data, "x")


def test_control_characters_are_binary_data():
    with pytest.raises(AmpPruneError, match="binary data .*control characters"):
        decode_text(("ab\x01\x02\x03" * 100).encode(), "x")
    assert decode_text("tab\tand\r\nform\x0cfeed".encode(), "x") == "tab\tand\r\nform\x0cfeed"


def test_the_cli_refuses_a_binary_eval_text_in_one_line(tmp_path, tiny_dir):
    f = tmp_path / "held.txt"
    f.write_bytes(TEXT.encode("utf-16-le"))
    proc = run_cli(tiny_dir(), "--eval-text", f, "--out", tmp_path / "o", *TINY)
    assert_one_line_error(proc, f"--eval-text file {f}: binary data")
    assert not (tmp_path / "o").exists()


def test_finetune_data_and_bias_jsonl_use_the_same_rules(tmp_path, tiny_dir):
    from amp_prune.config import FinetuneConfig
    from amp_prune.recover.finetune import finetune
    from bias_probe import BiasProbeError
    from bias_probe.datasets import load_user

    data = tmp_path / "train.txt"
    data.write_bytes(os.urandom(3000) + b"\x00")
    with pytest.raises(AmpPruneError, match=f"^training data file {data}: binary data"):
        finetune(FinetuneConfig(model=str(tmp_path / "no-model"), data=str(data), out=str(tmp_path / "o")))
    rows = [f'{{"text": "Is {{attribute}} here?", "label": {i % 2}, "attribute": "{a}"}}' for i, a in
            enumerate(["x", "y"] * 3)]
    (tmp_path / "b16.jsonl").write_bytes("\n".join(rows).encode("utf-16"))
    (tmp_path / "b8.jsonl").write_text("\n".join(rows), encoding="utf-8")
    utf16, utf8 = load_user(tmp_path / "b16.jsonl")[0], load_user(tmp_path / "b8.jsonl")[0]
    assert [i.texts for i in utf16] == [i.texts for i in utf8] and len(utf8) == 6
    (tmp_path / "bad.jsonl").write_bytes("\n".join(rows).encode("utf-16-le"))
    with pytest.raises(BiasProbeError, match="not UTF-8-SIG text at byte 1 .*save it as UTF-8"):
        load_user(tmp_path / "bad.jsonl")
