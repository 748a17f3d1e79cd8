"""Real prose found on any machine: license texts and the Python standard library's docstrings (demo data, tests)."""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

LICENSE_DIRS = (Path("/usr/share/common-licenses"),)


@functools.lru_cache(maxsize=1)
def paragraphs(limit: int = 4000) -> tuple[str, ...]:
    """Up to `limit` non-trivial paragraphs of English prose, in a stable order."""
    found: list[str] = []
    for folder in LICENSE_DIRS:
        for file in sorted(folder.glob("*")) if folder.is_dir() else []:
            if file.is_file():
                found += _split(file.read_text(errors="replace"))
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
    return tuple(found[:limit])


def _split(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 6]
