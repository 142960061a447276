"""The built-in corpus: Python's own documentation and standard library as text.

Ships with every interpreter, so `kind: builtin` sources work offline anywhere:
`prose` is the documentation topics (pydoc_data) plus every standard-library
module's docstrings (read with `ast`, never imported); `code` is the
standard-library source cut into chunks. Deterministic for a Python version.

Splits of those two, for protocols that need several distinguishable sources
(tools/compare.py --protocol cycles): `docs` (the documentation topics) and
`docstrings` (the modules' docstrings) partition `prose`; `code_net` (the
standard library's network and mail packages, NET_PACKAGES) and `code_core` (the
rest of its source, less pydoc_data, whose topics are `docs`' text, and less any
chunk that also occurs in code_net) are disjoint parts of `code`.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path

from datasets import Dataset

from nemoe.config.data import BUILTIN_CORPORA
from nemoe.documents import pieces
from nemoe.errors import UserError

# Top-level standard-library modules and packages of code_net: protocols, mail, the web.
NET_PACKAGES = frozenset({
    "email", "http", "urllib", "xmlrpc", "wsgiref", "mailbox", "imaplib", "smtplib", "smtpd", "poplib",
    "nntplib", "ftplib", "socket", "socketserver", "ssl", "cgi", "cgitb", "mimetypes", "telnetlib",
    "asynchat", "asyncore", "ipaddress", "webbrowser", "mailcap", "quopri", "uu", "base64", "binhex"})
CODE_EXCLUDED = frozenset({"pydoc_data"})   # its topics are the docs corpus, as text in a .py file
# Folders of the standard library that are not its own prose/code
# (tests, third-party packages, the IDE, the retired 2to3 tool).
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                              "__pycache__", "turtledemo"})
CODE_CHUNK_LINES = 120  # a code document ends at the first top-level def/class after this many lines


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of every UTF-8 standard-library .py file, in sorted path order."""
    root = Path(os.__file__).resolve().parent
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files = []
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        try:
            files.append((path.relative_to(root).as_posix(), path.read_bytes().decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not UTF-8: not worth a special case
    return tuple(files)


def _module_docstrings(source: str) -> str:
    """All docstrings of one module (module, classes, functions) in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
    docs = (ast.get_docstring(n) for n in nodes)
    return "\n\n".join(d for d in docs if d and d.strip())


def _top_level(path: str) -> str:
    """The top-level module or package of a standard-library path: 'email/utils.py' -> 'email'."""
    return path.split("/", 1)[0].removesuffix(".py")


def _code_chunks(source: str) -> list[str]:
    """A module's source cut at top-level def/class/decorator lines into documents of ~CODE_CHUNK_LINES."""
    chunks, current = [], []
    for line in source.splitlines(keepends=True):
        starts_definition = line.startswith(("def ", "class ", "async def ", "@"))
        if starts_definition and len(current) >= CODE_CHUNK_LINES:
            chunks.append("".join(current))
            current = []
        current.append(line)
    if current:
        chunks.append("".join(current))
    return chunks


@functools.lru_cache(maxsize=2 * len(BUILTIN_CORPORA))
def builtin_corpus(name: str, max_chars: int = 0) -> Dataset:
    """The built-in corpus `name` as an in-memory Dataset with one `text` column (cached per process).

    prose: the interpreter's documentation topics (pydoc_data) and, per standard-library
    module, its docstrings (read with `ast`, never imported). code: the standard-library
    source, cut into chunks. docs / docstrings: prose's two parts; code_net / code_core:
    the network packages' source and the rest (see the module docstring). Deterministic for
    a given Python version; needs no network.
    max_chars > 0: documents longer than that are cut at line ends into pieces of at most
    max_chars characters, each a document (data.max_doc_chars).
    """
    if name in ("prose", "docs"):
        from pydoc_data.topics import topics
        texts = [topics[key] for key in sorted(topics)]
    else:
        texts = []
    if name in ("prose", "docstrings"):
        texts += [_module_docstrings(source) for _, source in _stdlib_files()]
    if name == "code":
        texts = [chunk for _, source in _stdlib_files() for chunk in _code_chunks(source)]
    elif name in ("code_net", "code_core"):
        net = [chunk for path, source in _stdlib_files() if _top_level(path) in NET_PACKAGES
               for chunk in _code_chunks(source)]
        if name == "code_net":
            texts = net
        else:   # a chunk that also occurs in a network package (a copied helper) stays in code_net only
            seen = set(net)
            texts = [chunk for path, source in _stdlib_files()
                     if _top_level(path) not in NET_PACKAGES | CODE_EXCLUDED
                     for chunk in _code_chunks(source) if chunk not in seen]
    elif name not in BUILTIN_CORPORA:
        raise UserError(f"unknown builtin corpus {name!r} (valid: {', '.join(BUILTIN_CORPORA)})")
    texts = [t for t in texts if t.strip()]
    if max_chars:
        texts = [piece for t in texts for piece in pieces(t, max_chars) if piece.strip()]
    return Dataset.from_dict({"text": texts})
