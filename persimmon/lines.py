"""One line of text for a message, however the exception that gave it was worded.

Every error this project prints or records is one line (a row's `error`, a request line's error message, the
CLI's `error:` line, a failed shard's reason), so what an exception says is joined here: its lines with "; ",
runs of whitespace as one space, cut to a length where the caller bounds it. Torch-free, so the storage layer
and the CLI use it too (through pipelines.errors)."""

from __future__ import annotations


def one_line(value: object, limit: int | None = None, with_type: bool = False, first: bool = False) -> str:
    """`value` (an exception or text) as one line, at most `limit` characters ("..." where it was cut);
    with_type: the exception's type name first (`ValueError: ...`); first: only its first non-blank line (Ray's
    errors go on with a traceback). An exception with no text is its type's name."""
    lines = [" ".join(line.split()) for line in str(value).splitlines() if line.strip()]
    text = "; ".join(lines[:1] if first else lines)
    if not text and isinstance(value, BaseException) and not with_type:
        return type(value).__name__
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if with_type and isinstance(value, BaseException):
        return f"{type(value).__name__}: {text}" if text else type(value).__name__
    return text
