"""The one atomic file writer, text and JSONL reader, and package-versions helper of ``amp_prune``.

``bias_probe`` keeps its own (it never imports ``amp_prune``); everything here uses these.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import platform
import resource
import sys
import uuid
from importlib import metadata
from pathlib import Path

from amp_prune.errors import AmpPruneError

PACKAGES = ("amp-prune", "torch", "transformers", "accelerate", "safetensors", "datasets", "gguf", "lm_eval", "peft")


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, payload: object) -> Path:
    """``payload`` as indented JSON, atomically (non-JSON values such as paths become strings)."""
    return write_atomic(path, json.dumps(payload, indent=1, default=str))


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROL = frozenset(range(32)) - {9, 10, 12, 13}  # C0 controls other than tab, newline, form feed, return


def decode_text(data: bytes, name: str) -> str:
    """``data`` as text: UTF-8 (with or without a BOM), or UTF-16/32 with a BOM; else a one-line error naming ``name``.

    Refused, with what was found: bytes that are not valid in the encoding ("not UTF-8 at byte 1234"), and
    binary data (a NUL byte, which is also what UTF-16 without a byte-order mark looks like, or more than 1%
    control characters).
    """
    fix = "save it as UTF-8 text (UTF-16 needs a byte-order mark)"
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None and b"\x00" in data:
        raise AmpPruneError(f"{name}: binary data (a NUL byte at byte {data.index(0)}; UTF-16 without a byte-order "
                            f"mark looks like this too); {fix}")
    try:
        text = data.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        raise AmpPruneError(f"{name}: not {(encoding or 'utf-8').upper()} at byte {e.start}; {fix}") from None
    controls = sum(1 for ch in text[:100_000] if ord(ch) in _CONTROL)
    if controls > 0.01 * min(len(text), 100_000):
        raise AmpPruneError(f"{name}: binary data ({controls} control characters in the first "
                            f"{min(len(text), 100_000)}); {fix}")
    return text


def read_text(path: str | Path, what: str = "text") -> str:
    """The text of a user's file through :func:`decode_text` (``what`` names the file's role in the error)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AmpPruneError(f"{what} file {path}: cannot read it ({e.strerror or e})") from None
    return decode_text(data, f"{what} file {path}")


def read_jsonl(path: str | Path, what: str = "JSON-lines") -> list:
    """The records of a JSON-lines file (blank lines skipped); a broken line is a one-line error naming it."""
    out = []
    for n, line in enumerate(read_text(path, what).split("\n"), 1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AmpPruneError(f"{path}:{n}: not valid JSON ({e.msg}); fix or replace the file") from None
    return out


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape a result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``); ``False`` where libc is not glibc.

    Large tensors freed by one stage stay in the process (fragmented heap) and add to the next stage's
    peak. Measured on Gemma 3 270M's default width run: peak RSS 4.03 GB without it (docs/benchmarks.md).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
