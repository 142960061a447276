"""Documents from source rows: the formats (plain text, Alpaca, WikiText articles) and
the held-out rule that splits every source into training and held-out documents.

Pure functions of a row batch and its `SourceConfig`; nemoe/sources.py opens the
sources and maps these over them.
"""

from __future__ import annotations

import hashlib
import re

from nemoe.config.data import SourceConfig


def is_heldout(text: str, fraction: float) -> bool:
    """The hash rule: a stable 64-bit digest of the text, read as a number in [0, 1), is below `fraction`.

    hashlib, not hash(): Python salts str hashes per process, which would move
    documents between training and evaluation from one run (or resume) to the next.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


def pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut at line ends into consecutive pieces of at most `max_chars` characters (a line
    longer than that is cut within itself); the pieces joined give `text` back."""
    out, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                out.append("".join(current))
                current, size = [], 0
            out.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            out.append("".join(current))
            current, size = [], 0
        if line:
            current.append(line)
            size += len(line)
    if current:
        out.append("".join(current))
    return out


def alpaca_document(instruction: str, input_text: str | None, output: str) -> str:
    """One Alpaca row as a prompt-response document (the input section only when non-empty)."""
    parts = [f"### Instruction:\n{(instruction or '').strip()}"]
    if input_text and input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}")
    parts.append(f"### Response:\n{(output or '').strip()}")
    return "\n\n".join(parts)


# " = Valkyria Chronicles III = " opens an article; " = = Gameplay = = " is a section inside one.
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(lines: list[str]) -> list[str]:
    """WikiText rows (one line each, blank rows between) grouped into article documents."""
    articles, current = [], []
    for line in lines:
        if not isinstance(line, str) or not line.strip():
            continue
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) and current:
            articles.append(current)
            current = []
        current.append(line)
    if current:
        articles.append(current)
    # Lines keep their own "\n"; joining with another gives the blank line between
    # paragraphs that the raw WikiText files have.
    return ["\n".join(article) for article in articles]


def format_batch(batch: dict, src: SourceConfig) -> dict:
    """A batch of raw rows -> {"text": [...], "source": [...]}, empty documents dropped."""
    if src.format == "alpaca":
        inputs = batch.get("input") or [None] * len(batch["instruction"])
        texts = [alpaca_document(i, x, o) for i, x, o in zip(batch["instruction"], inputs, batch["output"])]
    elif src.format == "wikitext":
        texts = wikitext_articles(batch[text_column(src)])
    else:
        texts = batch[text_column(src)]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    return {"text": texts, "source": [src.name] * len(texts)}


def text_column(src: SourceConfig) -> str:
    return "text" if src.kind == "builtin" else src.text_field


def required_columns(src: SourceConfig) -> list[str]:
    return ["instruction", "output"] if src.format == "alpaca" else [text_column(src)]
