"""Calibration sources, chunking, determinism, held-out split and error cases."""

from __future__ import annotations

import json

import pytest
from tiny import char_tokenizer

from amp_prune.calib.data import DEFAULT_SOURCE, build_batches, load_texts, make_chunks
from amp_prune.errors import AmpPruneError

TOK = char_tokenizer()


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second paragraph"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert load_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Do it", "input": "", "output": "Done."}, "raw"]))
    assert load_texts(str(tmp_path / "c.json")) == ["Do it\nDone.", "raw"]
    (tmp_path / "d.jsonl").write_text('{"body": "custom field"}\n')
    assert load_texts(str(tmp_path / "d.jsonl"), field="body") == ["custom field"]


def test_builtin_default_is_packaged_and_permissive():
    texts = load_texts(DEFAULT_SOURCE)
    assert len(texts) == 300 and all(texts)


@pytest.mark.parametrize("content,match", [("", "has no text"), ("\n\n  \n", "has no text"),
                                           ("short", "too short")])
def test_empty_or_short_files(tmp_path, content, match):
    f = tmp_path / "c.txt"
    f.write_text(content)
    with pytest.raises(AmpPruneError, match=match):
        build_batches(TOK, str(f), num_samples=4, seq_len=32)


def test_bad_json_and_missing_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(AmpPruneError, match=r"bad.jsonl:2: not valid JSON"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(AmpPruneError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))


def test_unreachable_dataset_name_is_one_line_error():
    with pytest.raises(AmpPruneError, match="cannot load calibration dataset") as e:
        load_texts("no-such-org/no-such-dataset-amp-prune")
    assert "\n" not in str(e.value)


def test_chunks_deterministic_padded_and_heldout_disjoint(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"document number {i} " * (3 + i % 7) for i in range(60)))
    c1, h1 = build_batches(TOK, str(f), num_samples=10, seq_len=64, batch_size=4, seed=1, eval_samples=6)
    c2, _ = build_batches(TOK, str(f), num_samples=10, seq_len=64, batch_size=4, seed=1, eval_samples=6)
    c3, _ = build_batches(TOK, str(f), num_samples=10, seq_len=64, batch_size=4, seed=2, eval_samples=6)
    assert [b.input_ids.tolist() for b in c1] == [b.input_ids.tolist() for b in c2]
    assert [b.input_ids.tolist() for b in c1] != [b.input_ids.tolist() for b in c3]
    assert sum(b.input_ids.shape[0] for b in c1) == 10 and sum(b.input_ids.shape[0] for b in h1) == 6
    rows = lambda bs: {tuple(r[m.bool()].tolist()) for b in bs for r, m in zip(b.input_ids, b.attention_mask)}  # noqa: E731
    assert not rows(c1) & rows(h1)
    for b in c1:
        assert b.input_ids.shape[1] <= 64
        lens = b.attention_mask.sum(1)
        for r, n in enumerate(lens):
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()  # right padding


def test_long_documents_are_cut_not_truncated():
    chunks = make_chunks(["x" * 120, "y" * 100], TOK, seq_len=32, seed=0)
    # 120 = 3x32 + 24 (kept); 100 = 3x32 + 4 (a 4-token tail is below MIN_CHUNK_TOKENS and dropped)
    assert sorted(len(c) for c in chunks) == [24, 32, 32, 32, 32, 32, 32]


def test_leading_rows_keeps_the_first_sequences_that_hold_the_tokens():
    import torch

    from amp_prune.calib.data import leading_rows, to_batches
    batches = to_batches([[5] * n for n in (10, 4, 7, 9, 3)], 2, pad_id=0)
    got = leading_rows(batches, 15)  # 10 + 4 < 15 <= 10 + 4 + 7
    assert [b.input_ids.shape for b in got] == [(2, 10), (1, 9)]
    assert sum(b.num_tokens for b in got) == 21 and torch.equal(got[1].input_ids[0, :7], torch.full((7,), 5))
    assert sum(b.num_tokens for b in leading_rows(batches, 10**6)) == 33
