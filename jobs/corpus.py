"""Real prose found on any machine: license texts, the Python standard library's docstrings and the Python
language reference that ships with every CPython (pydoc's topics): demo data, tests and benchmarks."""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

LICENSE_DIRS = (Path("/usr/share/common-licenses"),)


@functools.lru_cache(maxsize=1)
def paragraphs(limit: int = 4000) -> tuple[str, ...]:
    """Up to `limit` non-trivial paragraphs of English prose, in a stable order."""
    found = license_paragraphs()
    found += docstring_paragraphs(max(0, limit - len(found)))
    return tuple(found[:limit])


def _split(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 6]


def license_paragraphs() -> list[str]:
    found: list[str] = []
    for folder in LICENSE_DIRS:
        for file in sorted(folder.glob("*")) if folder.is_dir() else []:
            if file.is_file():
                found += _split(file.read_text(errors="replace"))
    return found


def docstring_paragraphs(limit: int = 4000) -> list[str]:
    found: list[str] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.glob("*.py")):
        if len(found) >= limit:
            break
        try:
            tree = ast.parse(file.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found += _split(doc)
    return found[:limit]


def reference_paragraphs() -> list[str]:
    """The Python language reference's text, as pydoc shows it (`help("if")`)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its pydoc data
        return []
    return [p for key in sorted(topics) for p in _split(topics[key])]


def labeled_paragraphs(per_source: int = 500) -> list[tuple[str, str]]:
    """(text, source) pairs: up to per_source distinct paragraphs from each source present on this machine
    (license, docstring, reference), none repeated across or within sources, in a stable order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for source, texts in (("license", license_paragraphs()), ("docstring", docstring_paragraphs()),
                          ("reference", reference_paragraphs())):
        kept = 0
        for text in texts:
            if kept < per_source and text not in seen:
                seen.add(text)
                out.append((text, source))
                kept += 1
    return out
