"""The error-line helper, for the pipelines and the jobs layer: persimmon.lines.one_line, where the model package
(the lowest layer, which words grammar errors too) keeps it."""

from persimmon.lines import one_line

__all__ = ["one_line"]
