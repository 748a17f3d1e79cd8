"""OpenAIBatchPipeline: OpenAI batch request lines in, one response (or error) line per request out: the lines
parsed without the model (requests.py), served by the engine or the base model (pipeline.py), and written as
OpenAI's batch output writes them (responses.py).

Each input row is one line of an OpenAI batch file, `{"custom_id", "method": "POST", "url", "body"}`. Three
endpoints are served by the one checkpoint: `/v1/chat/completions` and `/v1/completions` through the
continuous-batching engine (every line with its own sampling parameters, stop strings, logprobs and
`response_format` grammar; `n` choices are `n` engine rows sharing the prompt), and `/v1/embeddings` through
the base model (the final hidden state at the last real token, or the mean, unit length by default).

Chat messages become the Persimmon chat prompt: system (and developer) messages first, as plain text, each
followed by a blank line; then each user message as `human: ...` and each assistant message as
`adept: ...`, separated by blank lines; then `\\n\\nadept:` for the answer, which also ends at the next
`\\n\\nhuman:`. Message content is a string or a list of text parts.

A line that cannot be served becomes that line's error (`{code, message}`), never the file's: whatever goes
wrong while reading, checking or tokenizing it (not UTF-8, not JSON, nested too deep, an integer of thousands of
digits, a lone surrogate escape, no custom_id or one seen before in the file, an unknown url, a field of the wrong
type or one we cannot honour given a value other than its default, a prompt past the model's window, a grammar
that does not compile), and what it may cost is bounded before it is parsed: MAX_LINE_BYTES per line, MAX_LIST
inputs or prompts (times n) per line, a prompt's length checked on a bounded prefix before it is tokenized whole.
A constrained row that did not complete is an error line (or `finish_reason: "length"` when max_tokens cut it),
never a 200 "stop". A line without a seed samples from a stream of its own; a seed reproduces. `usage` counts the tokens the model read (BOS included)
and wrote. The output table has one row per line: line, custom_id, ok, and the JSON record to write.
"""

from __future__ import annotations

from persimmon.lazy import lazy_exports

from ..schema import MAX_LINE_BYTES  # noqa: F401 -- part of this package's interface
from .requests import MAX_LIST, LineError, RequestParser, chat_prompt  # noqa: F401

_EXPORTS = {"OpenAIBatchPipeline": ".pipeline", "OUTPUT": ".pipeline"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["MAX_LINE_BYTES", "MAX_LIST", "OUTPUT", "LineError", "OpenAIBatchPipeline", "RequestParser", "chat_prompt"]
