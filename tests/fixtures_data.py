"""Local files shaped like the real sources (FineWeb, Alpaca-cleaned, WikiText-103).

Every document carries a marker such as `fw00042`, a word that identifies it, so a
test can tell which documents ended up in a stream after tokenizing and decoding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

MARKER = re.compile(r"\b(?:fw|al|wk)\d{5}\b")
_WORDS = ("the river bends past an old mill where children learn to swim in summer and "
          "the miller keeps a ledger of every sack of grain that crosses his floor").split()


def _sentence(i: int, n_words: int) -> str:
    words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(n_words)]
    return " ".join(words).capitalize() + "."


def fineweb_rows(n: int, prefix: str = "fw") -> list[dict]:
    """FineWeb-like rows: text plus the metadata columns FineWeb has."""
    return [{
        "text": f"Document {prefix}{i:05d}. " + " ".join(_sentence(i + k, 8 + (i + k) % 9) for k in range(1 + i % 6)),
        "id": f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>",
        "dump": "CC-MAIN-2024-10",
        "url": f"https://example.org/{prefix}/{i}",
        "date": "2024-02-21T00:00:00Z",
        "file_path": "s3://commoncrawl/crawl-data/example.warc.gz",
        "language": "en",
        "language_score": 0.95,
        "token_count": 40 + i % 50,
    } for i in range(n)]


def write_fineweb(path: Path, n: int = 300, prefix: str = "fw") -> Path:
    pd.DataFrame(fineweb_rows(n, prefix)).to_parquet(path)
    return path


def alpaca_rows(n: int) -> list[dict]:
    """Alpaca-cleaned-like rows; two in three have an empty input, as in the real set."""
    return [{
        "instruction": f"Describe item al{i:05d} in one sentence.",
        "input": "" if i % 3 else f"The item is number {i}.",
        "output": _sentence(i, 6 + i % 5),
    } for i in range(n)]


def write_alpaca(path: Path, n: int = 200) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in alpaca_rows(n):
            f.write(json.dumps(row) + "\n")
    return path


def wikitext_lines(n_articles: int) -> list[str]:
    """WikiText-103-like rows: one line each, blank rows between, ' = Title = ' headings."""
    lines = [""]
    for a in range(n_articles):
        lines += [f" = Article wk{a:05d} = \n", ""]
        for s in range(1 + a % 3):
            lines += [f" {_sentence(a + s, 12)} @-@ {_sentence(a * 3 + s, 9)} \n", ""]
            lines += [f" = = Section {s} = = \n", "", f" {_sentence(a + 5 * s, 10)} \n", ""]
    return lines


def write_wikitext(path: Path, n_articles: int = 100) -> Path:
    pd.DataFrame({"text": wikitext_lines(n_articles)}).to_parquet(path)
    return path


def markers(text: str) -> set[str]:
    """The document markers (fw00042, al00007, wk00003) that occur in `text`."""
    return set(MARKER.findall(text))
