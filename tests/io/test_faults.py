"""Faults on the user's side get one line that names the path and the fix, exit 2, and leave nothing behind."""

from __future__ import annotations

import os
import re
from collections import namedtuple

import pytest
from safetensors import SafetensorError
from test_cli import TINY
from transformers import PreTrainedModel

import amp_prune.io.faults as faults
import amp_prune.pipeline as pipeline
from amp_prune.cli import main


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    # progress bars are not messages (pytest's process can have transformers' bars on; the CLI's process has them off)
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.search(r"it/s\]\s*$", ln)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("amp-prune: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def test_a_full_disk_during_the_export(tiny_dir, tmp_path, monkeypatch, capsys):
    src, out = tiny_dir(), tmp_path / "out"
    real = PreTrainedModel.save_pretrained

    def fills_up(self, folder, *a, **k):  # half a checkpoint lands, then the device is full, as safetensors reports it
        real(self, folder, *a, **k)
        (folder / "model.safetensors").write_bytes(b"x" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    line = one_line_error(capsys, main([str(src), "--ratio", "0.3", "--out", str(out), *TINY]))
    assert f"no space left on the device of {tmp_path} (" in line and "the export needs about" in line, line
    assert "choose another --out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing at the target or beside it


def test_too_little_free_space_is_refused_before_calibration(tiny_dir, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda _p: usage(10_000, 9_000, 1_000))
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    line = one_line_error(capsys, main([str(tiny_dir()), "--ratio", "0.3", "--out", str(tmp_path / "o"), *TINY]))
    assert f"{tmp_path} has 1000 B free and the export needs about" in line and "choose another --out" in line
    assert not (tmp_path / "o").exists()


def test_a_truncated_checkpoint_is_named(tiny_dir, tmp_path, capsys):
    src = tiny_dir()
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = one_line_error(capsys, main([str(src), "--out", str(tmp_path / "o"), *TINY]))
    assert line.startswith(f"amp-prune: error: {f} is damaged or truncated (") and "export the model again" in line
    assert not (tmp_path / "o").exists()


def test_an_output_folder_without_write_permission(tiny_dir, tmp_path, monkeypatch, capsys):
    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(faults.Path, "touch", denied)
    monkeypatch.setattr(pipeline, "load_placed", lambda *a, **k: pytest.fail("the model was loaded"))
    line = one_line_error(capsys, main([str(tiny_dir()), "--out", str(tmp_path / "locked" / "o"), *TINY]))
    assert f"cannot write to {tmp_path} (Permission denied)" in line and "choose an --out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-llama_gqa"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_folder_for_real(tiny_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_line_error(capsys, main([str(tiny_dir()), "--out", str(locked / "o"), *TINY]))
    finally:
        locked.chmod(0o700)
    assert f"cannot write to {locked}" in line


def test_a_full_disk_during_the_gguf_write(tiny_dir, tmp_path, monkeypatch, capsys):
    """--gguf writes inside the export's temporary folder, and `amp-prune gguf` to a temporary name: a full disk
    half-way through the GGUF leaves neither a half file nor a half export."""
    import errno

    import amp_prune.io.gguf_export as gguf_export
    src, out = tiny_dir(), tmp_path / "out"
    assert main([str(src), "--ratio", "0.3", "--out", str(out), *TINY]) == 0
    before = sorted(p.name for p in out.iterdir())

    def fills_up(model, tokenizer, path, kind, **k):
        path.write_bytes(b"GGUF" + b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_gguf", fills_up)
    monkeypatch.setattr(gguf_export, "write_gguf", fills_up)
    line = one_line_error(capsys, main([str(src), "--ratio", "0.3", "--out", str(tmp_path / "two"), "--gguf", "f16",
                                        *TINY]))
    assert f"no space left on the device of {tmp_path} (" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])
    line = one_line_error(capsys, main(["gguf", str(out), "--type", "q8_0"]))
    assert f"no space left on the device of {out} (" in line, line
    assert sorted(p.name for p in out.iterdir()) == before
