"""Write WikiText-2's validation split as one JSONL record per article, in the test text's own format.

    python benchmarks/wikitext_valid.py /tmp/wt2_valid.jsonl

The perplexity protocol measures WikiText-2 *test* (rows joined by ``"\\n\\n"``). The train split
is not in ``shared/data`` (SOURCES.md, section 7); the validation split is, as the official
``wiki.valid.tokens`` (rare words replaced by ``<unk>``, otherwise the same ``@-@`` / `` = = `` format).
This writes it as the test string is built (each non-empty line a row ending in ``"\\n"``, empty
lines as empty rows, rows joined by ``"\\n\\n"``), cut into articles at the top-level ``= Title =``
headings, so it can be passed as ``--data`` (recovery) or ``--calib`` (calibration) to measure
what text in the evaluation's own format does. It prints the 13-word sequences the file shares
with the test text (only section headings, such as ``= = Reception = =``, for this split).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, wikitext_text  # noqa: E402

TITLE = re.compile(r" = [^=].*[^=] = ")


def articles(tokens_file: Path) -> list[str]:
    """The articles of a ``wiki.*.tokens`` file, each rebuilt as ``"\\n\\n".join(rows)``."""
    rows = [line + "\n" if line.strip() else "" for line in tokens_file.read_text(encoding="utf-8").split("\n")]
    out: list[list[str]] = [[]]
    for row in rows:
        if TITLE.fullmatch(row.rstrip("\n")) and out[-1]:
            out.append([])
        out[-1].append(row)
    return ["\n\n".join(a).strip("\n") for a in out if any(r.strip() for r in a)]


def shared_ngrams(a: str, b: str, n: int = 13) -> set[tuple[str, ...]]:
    def grams(s: str) -> set[tuple[str, ...]]:
        w = s.split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    return grams(a) & grams(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the .jsonl file to write")
    args = ap.parse_args()
    texts = articles(SHARED_DATA / "wikitext2" / "wiki.valid.tokens")
    shared = shared_ngrams(wikitext_text(), " ".join(texts))
    Path(args.out).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    print(f"{len(texts)} articles, {sum(len(t) for t in texts):,} characters -> {args.out}; "
          f"13-word sequences shared with the test text: {len(shared)}")
    for g in sorted(shared):
        print("  " + " ".join(g))


if __name__ == "__main__":
    main()
