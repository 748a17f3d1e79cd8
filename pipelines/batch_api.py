"""OpenAIBatchPipeline: OpenAI batch request lines in, one response (or error) line per request out.

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

import base64
import collections
import dataclasses
import functools
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM, SamplingParams, __version__
from persimmon.engine import GenerationEngine, Request
from persimmon.sampling import MAX_LOGPROBS, FinishReason

from .batching import (MAX_CHARS_PER_TOKEN, NONFINITE, EncodedRow, ModelPipeline, checked_options, engine_stream,
                       finite, pad_batch, plan_batches)
from .embed import pool
from .errors import one_line
from .options import BatchAPIOptions
from .schema import MAX_LINE_BYTES

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding"}
OUTPUT = pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("ok", pa.bool_()), ("record", pa.string())])
MAX_CHOICES = 8
MAX_LIST = 2048  # embedding inputs, prompts, and prompts x n per line (OpenAI's embeddings bound)
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # seeds are int64, as OpenAI's
CHAT_STOP = "\n\nhuman:"
# fields accepted at their default value only (null is every field's default); anything else names the field
DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "stream": False, "tools": [], "functions": [],
    "tool_choice": "none", "function_call": "none", "echo": False, "suffix": "", "modalities": ["text"],
    "dimensions": None, "audio": None, "prediction": None, "reasoning_effort": None, "web_search_options": None,
}
IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
FIELDS = {
    "chat": {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
             "logprobs", "top_logprobs", "response_format"},
    "completion": {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "best_of"},
    "embedding": {"input", "encoding_format"},
}


class LineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _is_unicode(text: str) -> bool:
    """Whether text is valid Unicode (no lone surrogate, which no UTF-8 writer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


MAX_INT_DIGITS = 4300  # Python's own limit on reading an integer from text


class _HugeInteger(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS:,} are read)")


def _integer(text: str) -> int:
    """json's parse_int: an integer past the digit limit is named as such (Python's own message would point the
    user at an interpreter setting)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _HugeInteger(len(text.lstrip("-")))
    return int(text)


_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


def _custom_id_of(raw: str) -> str | None:
    """A line's custom_id where the line as a whole cannot be read, when it names exactly one (a best effort,
    so that its error can still be matched to its request)."""
    found = _CUSTOM_ID.findall(raw)
    if len(found) != 1:
        return None
    try:
        value = json.loads(found[0])
    except ValueError:
        return None
    return (value if _is_unicode(value) else _escaped(value)) or None


def _short(value: Any, limit: int = 60) -> str:
    big = isinstance(value, int) and value.bit_length() > 100
    text = f"an integer of {value.bit_length()} bits" if big else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _digest(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _record(value: dict) -> str:
    """An output line: UTF-8 text as it is, or (should any string in it not be valid Unicode) ASCII with escapes,
    so writing it can never fail."""
    text = _dumps(value)
    return text if _is_unicode(text) else json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise LineError("invalid_request", f"{name} must be an integer {bounds}, got {_short(value)}")
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high) \
            or not math.isfinite(value):
        raise LineError("invalid_request", f"{name} must be a number from {low} to {high}, got {_short(value)}")
    return float(value)


def _check_fields(body: dict, kind: str) -> None:
    for name, value in body.items():
        if name in FIELDS[kind] or name in IGNORED or value is None:
            continue
        if name in DEFAULTS:
            if value == DEFAULTS[name] or (name == "best_of" and value == body.get("n", 1)):
                continue
            raise LineError("unsupported_parameter", f"{name}: only its default ({_dumps(DEFAULTS[name])}) is "
                                                     f"supported, got {_dumps(value)}")
        raise LineError("unsupported_parameter", f"{name} is not supported by persimmon-batch's {kind} endpoint")


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError("invalid_request", f"{where}.content: only text parts are supported, got "
                                                   f"{_dumps(part)[:100]}")
            parts.append(part["text"])
        return "".join(parts)
    raise LineError("invalid_request", f"{where}.content must be a string or a list of text parts")


def chat_prompt(messages: Any) -> str:
    """The Persimmon chat prompt of OpenAI chat messages (see the module's docstring)."""
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_request", "messages must be a non-empty list")
    system, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise LineError("invalid_request", f"{where} must be an object")
        role = message.get("role")
        text = _content(message, where)
        if role in ("system", "developer"):
            if turns:
                raise LineError("invalid_request", f"{where}: a {role} message must come before the conversation")
            system.append(text)
        elif role == "user":
            turns.append(f"human: {text}")
        elif role == "assistant":
            turns.append(f"adept: {text}")
        else:
            raise LineError("invalid_request", f"{where}.role {_short(role)} is not supported (system, developer, "
                                               "user, assistant)")
    if not turns:
        raise LineError("invalid_request", "messages hold no user message")
    head = "".join(f"{s}\n\n" for s in system)
    return head + "\n\n".join(turns) + "\n\nadept:"


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, source: str):
    from persimmon.grammar import Grammar, GrammarError

    try:
        grammar = Grammar.json_schema(source) if kind == "json_schema" else Grammar(kind, source)
        grammar.check()
    except GrammarError as exc:
        raise LineError("invalid_request", f"response_format: {one_line(exc)}") from None
    return grammar


def response_grammar(value: Any):
    """The grammar of a chat line's response_format (None for text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LineError("invalid_request", "response_format must be an object")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _grammar("json_schema", '{"type":"object","additionalProperties":true}')
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise LineError("invalid_request", "response_format.json_schema.schema must be a JSON schema object")
        return _grammar("json_schema", _dumps(schema))
    raise LineError("invalid_request", f"response_format.type {_short(kind)} is not supported (text, json_object, "
                                       "json_schema)")


@dataclass
class _Line:
    number: int
    custom_id: str | None
    kind: str = ""
    body: dict = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)  # completion: one per prompt; chat: one
    texts: list[str] = field(default_factory=list)
    n: int = 1
    completions: dict[tuple[int, int], Any] = field(default_factory=dict)  # (prompt, choice) -> Completion
    left: int = 0
    record: str | None = None  # the finished output line
    ok: bool = False
    logprobs: int | None = None  # chat: top_logprobs when logprobs is true; completion: logprobs
    params: SamplingParams | None = None


@dataclass(eq=False)
class _Batch:
    lines: list[_Line]
    left: int


class OpenAIBatchPipeline(ModelPipeline):
    def __init__(self, model_dir: str | Path, options: BatchAPIOptions | None = None, *,
                 device: str | torch.device = "cpu", text_column: str | None = None, **overrides) -> None:
        o = checked_options(options or BatchAPIOptions(), overrides)
        self._load(model_dir, o, PersimmonForCausalLM, device, text_column)
        self.window = self.config.max_position_embeddings
        self.model_name = Path(model_dir).name
        self.vocabulary = None
        self.engine = GenerationEngine(
            self.model, o.max_new_tokens, decode=self.tokenizer.decode, kv_cache_bytes=o.kv_cache_bytes, prefill_tokens=o.batch_tokens,
            vocab_limit=self.tokenizer.vocab_size, pad_token_id=self.tokenizer.padding_id, compile=o.compile)
        self.schema = OUTPUT
        self._seen: dict[str, int] = {}  # custom_id -> its line, over one stream (one input file)

    # -- the interface the runner's workers use -----------------------------------------------------------
    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        return next(iter(self.stream([batch])))

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        """Each input batch's output table, in input order (one stream is one file: custom_ids are unique
        within it)."""
        self.engine.reset()
        self._seen = {}

        def finish(entry: _Batch, seconds: float) -> pa.Table:
            self.stats.rows += len(entry.lines)
            self.stats.errors += sum(not line.ok for line in entry.lines)
            self.stats.seconds += seconds
            return pa.table([pa.array([x.number for x in entry.lines], pa.int64()),
                             pa.array([x.custom_id for x in entry.lines], pa.string()),
                             pa.array([x.ok for x in entry.lines], pa.bool_()),
                             pa.array([x.record for x in entry.lines], pa.string())], schema=OUTPUT)

        def drain(done) -> None:
            for c in done:
                entry, line, key = c.key
                line.completions[key] = c
                line.left -= 1
                self.stats.generated_tokens += len(c.tokens)
                if line.left == 0:
                    self._finish(line)
                    entry.left -= 1
                    self._report(1)

        yield from engine_stream(self.engine, batches, self._enqueue, drain, finish, self._beat)

    # -- lines in ------------------------------------------------------------------------------------------
    def _enqueue(self, batch: pa.RecordBatch | pa.Table) -> _Batch:
        numbers = batch.column("line").to_pylist() if "line" in batch.schema.names else list(range(1, batch.num_rows + 1))
        raws = batch.column("request").to_pylist()
        lines = [self._parse(number, raw) for number, raw in zip(numbers, raws)]
        entry = _Batch(lines, 0)
        embeddings = [line for line in lines if line.record is None and line.kind == "embedding"]
        if embeddings:
            self._embed(embeddings)
        immediate = 0
        for line in lines:
            if line.record is not None:
                immediate += 1
                continue
            self._add(entry, line)
        self._report(immediate)
        return entry

    def _parse(self, number: int, raw: bytes | str | None) -> _Line:
        """One line read, checked and tokenized; anything that goes wrong is that line's error."""
        line = _Line(number, None)
        try:
            self._parse_into(line, raw)
        except LineError as exc:
            self._error(line, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 -- one line's failure of any kind stays that line's
            self._error(line, "invalid_request",
                        f"line {number} could not be served: {one_line(exc, 300, with_type=True)}")
        return line

    def _claim(self, line: _Line, custom_id: str | None) -> bool:
        """Give the line its custom_id unless an earlier line of the file named it: each custom_id is in the
        output once, on the first line's record (a line that cannot be read keeps the one it names, so a later
        line with that id is a duplicate). False where an earlier line has it."""
        if custom_id is None:
            return True
        if custom_id in self._seen:
            return False
        self._seen[custom_id] = line.number
        line.custom_id = custom_id
        return True

    def _parse_into(self, line: _Line, raw: bytes | str | None) -> None:
        where = f"line {line.number}"
        if raw is not None and len(raw) > MAX_LINE_BYTES:
            raise LineError("line_too_large", f"{where} is longer than the {MAX_LINE_BYTES:,} bytes a line may have")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._claim(line, _custom_id_of(raw.decode("utf-8", "replace")))
                raise LineError("invalid_utf8", f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            request = json.loads(raw or "", parse_int=_integer)
        except json.JSONDecodeError as exc:
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError("invalid_json", f"{where} is not JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError("invalid_json", f"{where} is JSON nested too deep to read") from None
        except ValueError as exc:  # an integer past the digit limit (_integer), or what else json refuses
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError("invalid_json", f"{where} holds {exc}" if isinstance(exc, _HugeInteger) else
                            f"{where} is not JSON we can read ({one_line(exc, 300, with_type=True)})") from None
        if not isinstance(request, dict):
            raise LineError("invalid_request", f"{where} is a JSON {type(request).__name__}, not a request object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise LineError("missing_custom_id", f"{where} has no custom_id (a non-empty string)")
        custom_id = custom_id if _is_unicode(custom_id) else _escaped(custom_id)
        if not self._claim(line, custom_id):  # its record has no custom_id: the earlier line's record has it
            raise LineError("duplicate_custom_id", f"{where}: custom_id {_short(custom_id)} was used before, on line "
                                                   f"{self._seen[custom_id]}")
        if "\\u" in raw and not _is_unicode(_dumps(request)):  # only a \\u escape can make a lone surrogate
            raise LineError("invalid_request", f"{where} holds a lone surrogate escape (\\ud800-\\udfff): not "
                                               "valid Unicode text")
        method = request.get("method", "POST")
        if method != "POST":
            raise LineError("invalid_url", f"method must be POST, got {_short(method)}")
        url = request.get("url")
        if not isinstance(url, str) or url not in ENDPOINTS:
            raise LineError("invalid_url", f"url {_short(url)} is not served (one of {sorted(ENDPOINTS)})")
        body = request.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", "body must be an object")
        line.kind, line.body = ENDPOINTS[url], body
        _check_fields(body, line.kind)
        if line.kind == "embedding":
            self._parse_embedding(line)
        else:
            self._parse_generation(line)

    def _tokens(self, text: str, where: str, room: int = 0) -> list[int]:
        """The prompt's tokens; a prompt past the window is found on a bounded prefix first (a prompt of
        megabytes is refused without tokenizing it whole)."""
        limit = self.options.prompt_limit(self.window)
        head = (limit + 2) * MAX_CHARS_PER_TOKEN  # a prefix that holds more than `limit` tokens if the text does
        if len(text) > head and len(self.tokenizer.encode(text[:head])) > limit + 1:
            raise LineError("context_length_exceeded", f"{where} has {len(text):,} characters: more than the "
                                                       f"{limit} tokens the model reads")
        ids = self.tokenizer.encode(text)
        if self.options.max_length is not None and len(ids) > self.options.max_length:
            raise LineError("context_length_exceeded", f"{where} has {len(ids)} tokens: more than --max-length "
                                                       f"{self.options.max_length}")
        if len(ids) + room > self.window:
            need = f" plus {room} to generate" if room else ""
            raise LineError("context_length_exceeded", f"{where} has {len(ids)} tokens{need}: past the model's "
                                                       f"window of {self.window}")
        return ids

    def _parse_embedding(self, line: _Line) -> None:
        value = line.body.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise LineError("invalid_request", "input must be a non-empty string or a list of them (token arrays "
                                               "are not supported)")
        if len(texts) > MAX_LIST:
            raise LineError("invalid_request", f"input has {len(texts):,} texts: at most {MAX_LIST} per line")
        encoding = line.body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise LineError("invalid_request", f"encoding_format must be float or base64, got {_short(encoding)}")
        line.texts = texts
        line.prompts = [self._tokens(t, f"input[{i}]") for i, t in enumerate(texts)]

    def _parse_generation(self, line: _Line) -> None:
        body, kind = line.body, line.kind
        if kind == "chat":
            prompts = [chat_prompt(body.get("messages"))]
        else:
            value = body.get("prompt")
            prompts = [value] if isinstance(value, str) else value
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise LineError("invalid_request", "prompt must be a string or a list of strings (token arrays are "
                                                   "not supported)")
            if len(prompts) > MAX_LIST:
                raise LineError("invalid_request", f"prompt has {len(prompts):,} prompts: at most {MAX_LIST} per line")
        limit = _int(body, "max_completion_tokens", 1) if kind == "chat" else None
        limit = limit if limit is not None else _int(body, "max_tokens", 1)
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise LineError("invalid_request", f"seed must be a 64-bit integer, got {_short(seed)}")
        line.n = _int(body, "n", 1, MAX_CHOICES) or 1
        if len(prompts) * line.n > MAX_LIST:
            raise LineError("invalid_request", f"{len(prompts)} prompts x n={line.n} is {len(prompts) * line.n:,} "
                                               f"completions: at most {MAX_LIST} per line")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise LineError("invalid_request", "stop must be a string or a list of up to 4 strings")
        if kind == "chat":
            stop = [*stop, CHAT_STOP]
            wants = body.get("logprobs")
            if wants not in (None, True, False):
                raise LineError("invalid_request", f"logprobs must be true or false, got {_short(wants)}")
            top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
            if top is not None and not wants:
                raise LineError("invalid_request", "top_logprobs needs logprobs: true")
            line.logprobs = (top or 0) if wants else None
            grammar = response_grammar(body.get("response_format"))
        else:
            line.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
            grammar = None
        if (grammar is not None or line.logprobs is not None) and self.vocabulary is None:
            from persimmon.grammar import vocabulary_for

            self.vocabulary = self.engine.vocabulary = vocabulary_for(self.tokenizer, self.config.vocab_size)
        line.texts = prompts
        line.prompts = []
        for i, text in enumerate(prompts):
            ids = self._tokens(text, "the prompt" if len(prompts) == 1 else f"prompt[{i}]", limit or 1)
            line.prompts.append(ids)
        longest = max(len(ids) for ids in line.prompts)
        new = limit if limit is not None else min(self.options.max_new_tokens, self.window - longest)
        if temperature == 0 or top_p == 0:
            temperature, top_p = 0.0, 1.0
        line.params = SamplingParams(
            temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
            seed=seed, max_new_tokens=new, stop=tuple(stop), logprobs=line.logprobs, grammar=grammar)

    def _add(self, entry: _Batch, line: _Line) -> None:
        entry.left += 1
        line.left = len(line.prompts) * line.n
        if line.params.seed is None and not line.params.greedy:
            # unseeded: a stream of the line's own, so two identical lines are two independent draws
            line.params = dataclasses.replace(line.params, seed=secrets.randbits(63))
        for p, ids in enumerate(line.prompts):
            for choice in range(line.n):  # choice 0 samples as `generate` would the same prompt and seed
                key = None if choice == 0 else np.asarray(ids, "<i8").tobytes() + f"#{choice}".encode()
                self.engine.add(Request((entry, line, (p, choice)), ids, line.params, seed_key=key))

    # -- records out -----------------------------------------------------------------------------------------
    def _ids(self, line: _Line) -> tuple[str, str, str]:
        digest = _digest(line.custom_id, line.number, _dumps(line.body))
        return f"batch_req_{digest}", f"req_{digest}", digest

    def _error(self, line: _Line, code: str, message: str) -> None:
        line.ok = False
        batch_id = f"batch_req_{_digest(line.custom_id, line.number, message)}"
        line.record = _record({"id": batch_id, "custom_id": line.custom_id, "response": None,
                               "error": {"code": code, "message": message}})

    def _respond(self, line: _Line, body: dict) -> None:
        batch_id, request_id, _ = self._ids(line)
        line.ok = True
        line.record = _record({"id": batch_id, "custom_id": line.custom_id,
                               "response": {"status_code": 200, "request_id": request_id, "body": body},
                               "error": None})

    def _nonfinite(self, line: _Line) -> None:
        """The line's model output was not finite (pipelines.batching.finite): its error, counted."""
        self.stats.nonfinite += 1
        self._error(line, "model_error", NONFINITE)

    def _finish(self, line: _Line) -> None:
        if any(c.finish_reason == FinishReason.NONFINITE for c in line.completions.values()):
            self._nonfinite(line)
            return
        failed = self._structured_failure(line)
        if failed is not None:
            self._error(line, "structured_output_failed", failed)
            return
        _, _, digest = self._ids(line)
        choices, written = [], 0
        for index, (p, choice) in enumerate(sorted(line.completions)):
            c = line.completions[(p, choice)]
            written += len(c.tokens)
            reason = "length" if c.finish_reason == FinishReason.LENGTH else "stop"
            if line.kind == "chat":
                choices.append({"index": index, "finish_reason": reason, "logprobs": self._chat_logprobs(c),
                                "message": {"role": "assistant", "content": (c.text or "").lstrip(), "refusal": None}})
            else:
                choices.append({"index": index, "finish_reason": reason, "text": c.text or "",
                                "logprobs": self._completion_logprobs(c, len(line.texts[p]))})
        read = sum(len(ids) for ids in line.prompts)
        body = {"id": f"{'chatcmpl' if line.kind == 'chat' else 'cmpl'}-{digest}",
                "object": "chat.completion" if line.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self._model(line), "choices": choices,
                "usage": {"prompt_tokens": read, "completion_tokens": written, "total_tokens": read + written},
                "system_fingerprint": f"persimmon-batch-{__version__}"}
        self._respond(line, body)

    def _structured_failure(self, line: _Line) -> str | None:
        """Why a constrained line's response would not hold what it claims, or None. A choice the grammar
        refused, or one that stopped short of a complete match, fails the line; one cut by max_tokens is a
        "length" choice, as OpenAI's; a JSON format's complete match must also parse as JSON."""
        if line.params is None or line.params.grammar is None:
            return None
        for (_, choice), c in sorted(line.completions.items()):
            if c.finish_reason == FinishReason.LENGTH:
                continue
            if c.error is not None:
                return f"choice {choice}: {c.error}"
            if self._json_format(line):
                try:
                    json.loads(c.text or "")
                except ValueError as exc:
                    return (f"choice {choice}: the grammar matched, but the text is not JSON "
                            f"({one_line(exc, 300, with_type=True)})")
        return None

    @staticmethod
    def _json_format(line: _Line) -> bool:
        value = line.body.get("response_format")
        return isinstance(value, dict) and value.get("type") in ("json_object", "json_schema")

    def _model(self, line: _Line) -> str:
        model = line.body.get("model")
        return model if isinstance(model, str) and model else self.model_name

    def _token(self, token: int) -> tuple[str, list[int]]:
        """A token's text (a lone byte as \\xNN) and its exact bytes (OpenAI's `bytes`; none for a control piece)."""
        tokens = self.vocabulary.tokens
        data = tokens[token] if token < len(tokens) else b""
        return self.vocabulary.text(token), [] if data.startswith(b"\xff") else list(data)

    def _chat_logprobs(self, c) -> dict | None:
        if c.logprobs is None:
            return None
        content = []
        for t in c.logprobs:
            text, data = self._token(t.id)
            top = [{"token": self._token(i)[0], "logprob": lp, "bytes": self._token(i)[1]} for i, lp in t.top]
            content.append({"token": text, "logprob": t.logprob, "bytes": data, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, c, offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        tokens, offsets = [], []
        for t in c.logprobs:
            offsets.append(offset)
            text = self._token(t.id)[0]
            tokens.append(text)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in c.logprobs],
                "top_logprobs": [{self._token(i)[0]: lp for i, lp in t.top} for t in c.logprobs],
                "text_offset": offsets}

    @torch.inference_mode()
    def _embed(self, lines: list[_Line]) -> None:
        rows, owners = [], []
        for line in lines:
            for i, ids in enumerate(line.prompts):
                rows.append(EncodedRow(len(rows), ids, False))
                owners.append((line, i))
        vectors: list[np.ndarray | None] = [None] * len(rows)
        for group in plan_batches(rows, self.options.batch_tokens):
            ids, mask = pad_batch(self.tokenizer, group, "right", self.stats.padding, self.device)
            hidden = self.model.model(ids, attention_mask=mask).last_hidden_state
            out = pool(hidden, mask, self.options.pooling).float()
            if self.options.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
            for row, vector in zip(group, out.cpu().numpy()):
                vectors[row.index] = vector
        per_line: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        for (line, _), vector in zip(owners, vectors):
            per_line[id(line)].append(vector)
        for line in lines:
            found = per_line[id(line)]
            if not all(finite(v) for v in found):
                self._nonfinite(line)
                continue
            base64_out = line.body.get("encoding_format") == "base64"
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if base64_out
                     else [float(x) for x in v]} for i, v in enumerate(found)]
            read = sum(len(ids) for ids in line.prompts)
            self._respond(line, {"object": "list", "data": data, "model": self._model(line),
                                 "usage": {"prompt_tokens": read, "total_tokens": read}})
