"""Faults on the user's side (a full disk, no permission, a damaged checkpoint) as one-line errors with the fix.

They are refused before the expensive work where that is cheap (:func:`check_writable`,
:func:`check_free_space`, :func:`check_safetensors`), and translated where they happen
(:func:`writing_to`): never reported as an internal error.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from amp_prune.errors import AmpPruneError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
SPACE_MARGIN = 1.05  # the export's files beyond the tensors (config, tokenizer, card) are small; 5% covers them


def user_fault(e: BaseException) -> str | None:
    """``"no space"`` or ``"no access"`` for a user-side I/O fault (an ``OSError``, or safetensors' Rust I/O error
    that carries the OS message), else ``None``."""
    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    if code in _NO_SPACE or "No space left on device" in text or "os error 28" in text:
        return "no space"
    if code in _NO_ACCESS or "Permission denied" in text or "Read-only file system" in text:
        return "no access"
    return None


def human(n: float) -> str:
    """``1234567890`` -> ``"1.15 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (shared tensors, such as tied embeddings, counted once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        elif t.device.type == "meta":
            total += t.numel() * t.element_size()
    return total


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists."""
    folder = folder.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(out: Path) -> None:
    """Refuse an output whose folder cannot be written (a probe file is created and removed at once)."""
    where = _existing(out.parent)
    probe = where / f".amp-prune-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        if user_fault(e) is None:
            raise
        raise AmpPruneError(f"cannot write to {where} ({e.strerror or e}): choose an --out in a folder you can write, "
                            "or fix its permissions") from None


def check_free_space(out: Path, need: int) -> None:
    """Refuse an export of about ``need`` bytes to ``out`` when its file system has less free."""
    where = _existing(out.parent)
    free = shutil.disk_usage(where).free
    if free < need * SPACE_MARGIN:
        raise AmpPruneError(f"{where} has {human(free)} free and the export needs about {human(need * SPACE_MARGIN)}: "
                            "free space there or choose another --out")


@contextlib.contextmanager
def writing_to(out: Path, need: int | None = None) -> Iterator[None]:
    """Turn a full disk or a permission fault raised inside into one line naming ``out``'s folder (and ``need``)."""
    try:
        yield
    except AmpPruneError:
        raise
    except Exception as e:  # noqa: BLE001 - only user faults are translated; the rest propagates unchanged
        kind = user_fault(e)
        if kind is None:
            raise
        where = _existing(out.parent)
        if kind == "no space":
            size = f"; the export needs about {human(need * SPACE_MARGIN)}" if need else ""
            raise AmpPruneError(f"no space left on the device of {where} ({human(shutil.disk_usage(where).free)} free"
                                f"{size}): free space there or choose another --out; nothing was written") from None
        raise AmpPruneError(f"cannot write to {where} (permission denied or a read-only file system): choose an --out "
                            "in a folder you can write; nothing was written") from None


def check_safetensors(folder: Path) -> None:
    """Open the header of every ``*.safetensors`` file in ``folder``; a damaged or truncated one is a one-line error."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is unreadable either way
            if isinstance(e, OSError) and user_fault(e) == "no access":
                raise AmpPruneError(f"cannot read {f}: permission denied") from None
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AmpPruneError(f"{f} is damaged or truncated ({reason}); download or export the model again") from None
