"""Helpers shared by the benchmark scripts: a peak-RSS sampler, table printing, the WikiText-2 text, --prune pairs."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SHARED_DATA = Path(os.environ.get("AMP_PRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


@contextmanager
def measure(record: dict, name: str, device: torch.device):
    """Record wall time, peak RSS during the block (sampled every 5 ms) and peak GPU memory."""
    peak = [rss_mb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    thread.start()
    t = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
        stop.set()
        thread.join()
        record[name] = {"wall_s": wall, "peak_rss_mb": max(peak[0], rss_mb())}
        if device.type == "cuda":
            record[name]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Print and return a Markdown table."""
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_json(path: str | None, payload) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1, default=str))


def wikitext_text() -> str:
    rows = json.loads((SHARED_DATA / "wikitext2" / "wikitext-2-raw-v1.test.rows.json").read_text())
    return "\n\n".join(rows)


def replace_section(path: Path, start: str, end: str, block: str, *, new_file: str = "", heading: str = "") -> None:
    """Put ``block`` between the ``start``/``end`` markers of a docs file (appended, under ``heading``, if absent)."""
    text = path.read_text() if path.is_file() else new_file
    block = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + heading + block + "\n"
    path.write_text(text)


def prune_overrides(ap, items: list[str]) -> dict:
    """``--prune KEY=VALUE`` pairs as PruneConfig fields (numbers parsed; ``attn_units`` stays a string)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--prune takes KEY=VALUE pairs (got {item!r}); e.g. --prune criterion=obs")
        out[key] = value
        if key != "attn_units":
            for kind in (int, float):
                try:
                    out[key] = kind(value)
                    break
                except ValueError:
                    pass
    return out
