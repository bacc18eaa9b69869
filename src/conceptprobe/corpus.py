"""Offline text corpora for per-token loss measurements (ICL score, token-loss PCA).

Built-in corpora exist on every machine with Python, with no download:

- ``stdlib-docs`` (default): the prose of the Python standard library in use. For each module file
  under ``sysconfig.get_paths()["stdlib"]`` (test suites, ``site-packages``, ``idlelib``, ``lib2to3``,
  ``ensurepip`` and ``turtledemo`` excluded), its module/class/function docstrings and its comments, in
  source order, one document per file. The set depends on the Python version, which is recorded.
- ``stdlib-source``: the same files, as raw source code.
- ``licenses``: the licence texts under ``/usr/share/common-licenses`` (Debian and derivatives; empty
  elsewhere), symlinks deduplicated.

Order is deterministic: files sorted by relative path, then shuffled with ``random.Random(seed)``.
User text (``--text PATH ...``) is read from files or folders (recursively, sorted), one document per
file, in the order given; files that are not UTF-8 text are skipped.
"""

from __future__ import annotations

import ast
import hashlib
import io
import platform
import random
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPORA = ("stdlib-docs", "stdlib-source", "licenses")
DEFAULT_CORPUS = "stdlib-docs"
LICENSE_DIR = Path("/usr/share/common-licenses")
_EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "ensurepip",
    "turtledemo",
}
_TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".tex",
    ".html",
    ".json",
    ".yaml",
    ".yml",
    ".csv",
    ".c",
    ".h",
    "",
}


class CorpusError(ValueError):
    """A corpus could not be read or holds too little text."""


@dataclass(frozen=True)
class Document:
    """One text document and a stable identifier (corpus name and relative path)."""

    doc_id: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's module files, sorted by relative path, test suites excluded."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def python_prose(source: str) -> str:
    """Docstrings and comments of Python ``source``, in source order, separated by blank lines.

    Consecutive comment lines are joined into one paragraph; shebang and coding lines are dropped.
    Returns "" for source that does not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body:
                pieces.append((node.body[0].lineno, doc.strip()))
    comment_lines: list[tuple[int, str]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith("!") and "coding" not in text[:20]:
                    comment_lines.append((tok.start[0], text))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        comment_lines = []
    block: list[str] = []
    start = last = -10
    for line, text in comment_lines:
        if line != last + 1 and block:
            pieces.append((start, " ".join(block)))
            block = []
        if not block:
            start = line
        block.append(text)
        last = line
    if block:
        pieces.append((start, " ".join(block)))
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in pieces)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _license_files() -> list[Path]:
    if not LICENSE_DIR.is_dir():
        return []
    seen: dict[Path, Path] = {}
    for path in sorted(LICENSE_DIR.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen[real] = path
    return list(seen.values())


def iter_corpus(name: str = DEFAULT_CORPUS, seed: int = 0) -> Iterator[Document]:
    """Documents of a built-in corpus in a seeded, deterministic order (lazily read)."""
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)} or pass --text PATH")
    if name == "licenses":
        files = _license_files()
        root = LICENSE_DIR
    else:
        files = stdlib_files()
        root = stdlib_root()
    random.Random(seed).shuffle(files)
    for path in files:
        text = _read_text(path)
        if not text:
            continue
        if name == "stdlib-docs":
            text = python_prose(text)
        if text.strip():
            yield Document(f"{name}:{path.relative_to(root).as_posix()}", text)


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths`` (folders searched recursively, sorted), in the order given."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES and not p.name.startswith(".")
            )
            out.extend(found)
        else:
            raise CorpusError(f"--text {raw}: no such file or folder")
    if not out:
        raise CorpusError(f"no text files found in {', '.join(map(str, paths))}")
    return out


def iter_text_paths(paths: Iterable[str | Path]) -> Iterator[Document]:
    """Documents from user files/folders, one per UTF-8 file, in the order given."""
    for path in text_files(paths):
        text = _read_text(path)
        if text and text.strip():
            yield Document(f"file:{path.as_posix()}", text)


def describe_corpus(
    name: str | None, paths: Iterable[str | Path] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Provenance of a corpus: what it is, where it lives, and a fingerprint of its file list."""
    if paths:
        files = text_files(paths)
        listing = "\n".join(f"{p.as_posix()}:{p.stat().st_size}" for p in files)
        return {
            "name": "text",
            "paths": [str(p) for p in paths],
            "n_files": len(files),
            "fingerprint": hashlib.sha256(listing.encode()).hexdigest()[:16],
        }
    if name == "licenses":
        files, root = _license_files(), LICENSE_DIR
    else:
        files, root = stdlib_files(), stdlib_root()
    listing = "\n".join(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in files)
    return {
        "name": name,
        "root": str(root),
        "python": platform.python_version(),
        "n_files": len(files),
        "seed": seed,
        "order": "files sorted by relative path, then random.Random(seed).shuffle",
        "fingerprint": hashlib.sha256(listing.encode()).hexdigest()[:16],
    }
