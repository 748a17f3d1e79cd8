"""Constrained decoding: a completion that must match a JSON schema, a regular expression, one of a list of
choices or a Lark grammar, enforced by masking the tokens that cannot continue it.

The grammar engine is llguidance (a Rust core with a token-mask API, no runtime dependencies). It sees the
model's vocabulary as bytes (`Vocabulary`): sentencepiece's `▁` is a space, byte-fallback pieces `<0xNN>` are
their byte, control pieces (BOS/EOS/pad/unk) are special tokens that text can never produce, and ids the
tokenizer does not have (a vocabulary padded past the tokenizer: the real 8B has ~70k unused embeddings)
are empty and never allowed. A grammar is compiled once per vocabulary (cached by its text); every row
starts from a copy of the compiled matcher; the masks of all constrained rows of a decode step are computed
in one parallel call.

JSON schemas compile with compact whitespace (none between tokens, `,` and `:` as separators), so a
completion cannot grow by whitespace alone, and objects take only their declared properties unless the
schema says `additionalProperties` (what makes the typed `parsed` column equal the completion).
"""

from __future__ import annotations

import collections

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .lines import one_line

KINDS = ("json_schema", "regex", "choices", "lark")
COMPILED_GRAMMARS = 64  # compiled grammars kept per vocabulary (least recently used dropped first) ...
COMPILED_SOURCE_BYTES = 16 << 20  # ... and their sources' bytes at most (a big schema compiles to a big matcher)
CHECKED_SOURCE_BYTES = 64 << 10  # grammars whose compile check is remembered (by their text)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(ValueError):
    """A grammar that does not compile (its message says why, in one line)."""


def _closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that does not set it."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class Grammar:
    """What a completion must match. Build with Grammar.json_schema / regex / choices / lark."""

    kind: str
    source: str  # the schema as JSON text, the pattern, the choices as a JSON list, the Lark text

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {list(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Grammar":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def choices(cls, choices: Sequence[str]) -> "Grammar":
        choices = list(choices)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError(f"choices must be non-empty strings, got {choices!r}")
        return cls("choices", json.dumps(choices))

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text)

    @property
    def schema(self) -> dict | None:
        return json.loads(self.source) if self.kind == "json_schema" else None

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "regex": "regex", "choices": "choices", "lark": "Lark grammar"}[self.kind]

    def llguidance(self) -> str:
        """The grammar in llguidance's own form."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(_closed_objects(self.schema), overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choices":
            lark = "start: " + " | ".join(json.dumps(c) for c in json.loads(self.source))
            return LLMatcher.grammar_from_lark(lark)
        return LLMatcher.grammar_from_lark(self.source)

    def check(self) -> None:
        """Raise GrammarError when the grammar does not compile (no vocabulary needed). Decided once per
        grammar in a process: the CLI's flags, the job's validation and each pipeline ask again."""
        small = len(self.source) <= CHECKED_SOURCE_BYTES  # a big schema is checked each time, not held
        problem = _compile_problem(self) if small else _compile_problem.__wrapped__(self)
        if problem is not None:
            raise GrammarError(problem)


@functools.lru_cache(maxsize=64)  # of sources up to CHECKED_SOURCE_BYTES: 4 MiB held at most
def _compile_problem(grammar: Grammar) -> str | None:
    """Why the grammar does not compile, or None."""
    from llguidance import LLMatcher

    try:
        text = grammar.llguidance()
    except (ValueError, RecursionError) as e:
        return f"the {grammar.describe()} does not compile: {one_line(e)}"
    message = LLMatcher.validate_grammar(text)
    if message and not message.startswith("WARNING"):
        return f"the {grammar.describe()} does not compile: {one_line(message)}"
    return None


def token_bytes(sp, special: set[int]) -> list[bytes]:
    """Each sentencepiece id as the bytes it writes; control/unknown/special pieces as b'\\xff<piece>'
    (llguidance's mark for a special token, which no text matches)."""
    out = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i in special or sp.is_control(i) or sp.is_unknown(i):
            out.append(b"\xff" + piece.encode())
        elif sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class Vocabulary:
    """The model's vocabulary as llguidance sees it, with the compiled-grammar cache and the mask buffers."""

    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:
        import llguidance

        sp = tokenizer.sp
        self.tokens = token_bytes(sp, tokenizer.special_ids)
        self.size = max(vocab_size or 0, len(self.tokens))  # the model's (padded) vocabulary
        padded = self.tokens + [b""] * (self.size - len(self.tokens))
        self._dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
        self._sp = sp
        wrapper = _Wrapper(padded, tokenizer.eos_token_id, tokenizer.bos_token_id, sorted(tokenizer.special_ids),
                           self._tokenize)
        eos = tokenizer.eos_token_id
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=self.size,
                                                  eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self.words = (self.size + 31) // 32
        self._compiled: collections.OrderedDict[Grammar, Any] = collections.OrderedDict()  # least recent first
        self._compiled_bytes = 0  # of the cached grammars' sources
        self._lock = threading.Lock()
        self._buffer = np.zeros((0, self.words), dtype=np.int32)

    def _tokenize(self, data: bytes) -> list[int]:
        """Ids whose bytes are exactly `data` (llguidance asks for text it must continue from): sentencepiece's
        own pieces, without the space it puts before a text."""
        text = data.decode("utf-8", errors="replace")
        if not self._dummy_prefix:
            return self._sp.encode(text)
        ids = self._sp.encode("a" + text)
        if ids and self._sp.id_to_piece(ids[0]) == "\u2581a":
            return ids[1:]
        out = []
        for ch in text:  # piece by character, byte fallback where there is none
            i = self._sp.piece_to_id(ch)
            if i != self._sp.unk_id():
                out.append(i)
            else:
                out += [self._sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
        return out

    def matcher(self, grammar: Grammar):
        """A fresh matcher for one row: a copy of the grammar compiled once for this vocabulary."""
        import llguidance

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                grammar.check()
                try:
                    compiled = llguidance.LLMatcher(self.lltokenizer, grammar.llguidance(), log_level=0)
                except (ValueError, RecursionError) as e:
                    raise GrammarError(f"the {grammar.describe()} does not compile: {one_line(e)}") from None
                if compiled.is_error():
                    raise GrammarError(f"the {grammar.describe()} does not compile: {compiled.get_error()}")
                self._compiled[grammar] = compiled
                self._compiled_bytes += len(grammar.source)
                while len(self._compiled) > 1 and (len(self._compiled) > COMPILED_GRAMMARS
                                                   or self._compiled_bytes > COMPILED_SOURCE_BYTES):
                    dropped, _ = self._compiled.popitem(last=False)
                    self._compiled_bytes -= len(dropped.source)
            else:
                self._compiled.move_to_end(grammar)
        return compiled.deep_copy()

    def probe(self, grammar: Grammar) -> None:
        """Compile the grammar for this vocabulary and take its first step (the first allowed token): some
        grammars compile but fail there (llguidance's parser limits, e.g. a row of more than 2,000 choices).
        Raises GrammarError with llguidance's message."""
        from .scheduler import grammar_error

        matcher = self.matcher(grammar)
        allowed = self.allowed(self.masks([matcher]), self.size)[0].nonzero()
        if matcher.is_error() or (len(allowed) and not matcher.consume_token(int(allowed[0]))) or matcher.is_error():
            raise GrammarError(f"the {grammar.describe()} cannot be followed: {grammar_error(matcher.get_error())}")

    def masks(self, matchers: Sequence[Any]) -> np.ndarray:
        """The allowed-token bitmasks of these matchers, (len, words) int32, computed in parallel (the GIL is
        released, so this may run beside a forward pass)."""
        from llguidance.numpy import fill_next_token_bitmask_par

        n = len(matchers)
        if self._buffer.shape[0] < n:
            self._buffer = np.zeros((max(n, 2 * self._buffer.shape[0]), self.words), dtype=np.int32)
        out = self._buffer[:n]
        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], out)
        return out.copy()

    def allowed(self, bitmask: np.ndarray, width: int):
        """Bitmasks as a bool tensor (rows, width): True where a token may come next."""
        import torch

        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width]
        return torch.from_numpy(bits.astype(bool))

    def decode(self, tokens: Sequence[int]) -> str:
        """Tokens as the exact text the grammar matched: their bytes joined (special pieces write nothing)."""
        data = b"".join(t for t in (self.tokens[i] if i < len(self.tokens) else b"" for i in tokens)
                        if not t.startswith(b"\xff"))
        return data.decode("utf-8", errors="replace")

    def text(self, token: int) -> str:
        """A token as text: its bytes decoded, a byte that is not UTF-8 on its own written as \\xNN."""
        data = self.tokens[token] if token < len(self.tokens) else b""
        if data.startswith(b"\xff"):
            return data[1:].decode("utf-8", errors="backslashreplace")
        return data.decode("utf-8", errors="backslashreplace")


class _Wrapper:
    """The tokenizer interface llguidance.TokenizerWrapper reads."""

    def __init__(self, tokens, eos, bos, special, tokenize) -> None:
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos, bos
        self.special_token_ids = special
        self._tokenize = tokenize

    def __call__(self, data: bytes) -> list[int]:
        return self._tokenize(data)


@functools.lru_cache(maxsize=8)
def vocabulary_for(tokenizer, vocab_size: int | None = None) -> Vocabulary:
    """One Vocabulary per tokenizer (building one reads every piece: ~1 s for a 262k vocabulary)."""
    return Vocabulary(tokenizer, vocab_size)
