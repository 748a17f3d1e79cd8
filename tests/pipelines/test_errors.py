"""The one helper that makes every message one line."""

from __future__ import annotations

from pipelines.errors import one_line


def test_lines_are_joined_whitespace_collapsed_and_the_cut_is_marked():
    exc = ValueError("first  line\n\n   second\tline  \n")
    assert one_line(exc) == "first line; second line"
    assert one_line(exc, 10) == "first line..."
    assert one_line(exc, with_type=True) == "ValueError: first line; second line"
    assert one_line(KeyError(), with_type=True) == "KeyError"
    assert one_line("plain text") == "plain text" and one_line("") == ""
