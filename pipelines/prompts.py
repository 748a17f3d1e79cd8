"""Prompt templates: `{text}` is the row's text; the template's own words survive truncation."""

from __future__ import annotations

from persimmon import PersimmonTokenizer

TEXT = "{text}"


class PromptTemplate:
    def __init__(self, template: str, **fixed: str) -> None:
        """template: must contain {text}; fixed: other {name} placeholders, filled once (e.g. {labels})."""
        if template.count(TEXT) != 1:
            raise ValueError(f"prompt template must contain {TEXT} exactly once, got {template!r}")
        for name, value in fixed.items():
            template = template.replace("{" + name + "}", value)
        self.template = template
        self.prefix, self.suffix = template.split(TEXT)

    def check_fits(self, tok: PersimmonTokenizer, max_length: int) -> None:
        """Fail early when the template's own tokens leave no room for any text."""
        fixed = len(tok.encode(self.prefix + self.suffix))
        if fixed >= max_length:
            raise ValueError(f"the prompt template alone takes {fixed} tokens; max_length is {max_length}")

    def render(self, text: str) -> str:
        return self.prefix + text + self.suffix

    def encode(self, tok: PersimmonTokenizer, text: str, max_length: int, truncation_side: str) -> tuple[list[int], bool]:
        """Ids of the rendered prompt (with BOS). When it is longer than max_length, the text alone is cut
        (on truncation_side): the kept tokens of the text are decoded and the template re-rendered around
        them, so the prompt is tokenized exactly as a user's own prompt of that text would be."""
        ids = tok.encode(self.render(text))
        if len(ids) <= max_length:
            return ids, False
        body = tok.encode(text, add_bos=False)
        room = max_length - len(tok.encode(self.render("")))
        while room > 0:
            kept = body[:room] if truncation_side == "right" else body[len(body) - room:]
            # a cut through a multi-byte character decodes to U+FFFD at the edge: drop it
            piece = tok.decode(kept).strip("\ufffd")
            ids = tok.encode(self.render(piece))
            if len(ids) <= max_length:
                return ids, True
            room -= len(ids) - max_length  # tokens merged differently at the template's edges
        raise ValueError(f"the prompt template leaves no room for text within max_length {max_length}")
