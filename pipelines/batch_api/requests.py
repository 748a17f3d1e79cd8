"""OpenAI batch request lines read, checked and tokenized, without the model: what each line asks for (its
endpoint, prompts as token ids, sampling parameters, grammar), or the error that line gets. See the package's
docstring for what is accepted; every problem is a LineError, never an exception out of `parse`."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from persimmon.kinds import Kind
from persimmon.params import MAX_LOGPROBS, SamplingParams

from ..errors import one_line
from ..schema import MAX_CHARS_PER_TOKEN, MAX_LINE_BYTES



class Endpoint(Kind):
    """What a request line asks for (by its url)."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class ErrorCode(Kind):
    """A failed line's `error.code` in the errors file (OpenAI's codes where it has one for the case)."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    LINE_TOO_LARGE = "line_too_large"
    MISSING_CUSTOM_ID = "missing_custom_id"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    INVALID_URL = "invalid_url"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    STRUCTURED_OUTPUT_FAILED = "structured_output_failed"
    MODEL_ERROR = "model_error"


ENDPOINTS = {"/v1/chat/completions": Endpoint.CHAT, "/v1/completions": Endpoint.COMPLETION,
             "/v1/embeddings": Endpoint.EMBEDDING}
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
    Endpoint.CHAT: {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
             "logprobs", "top_logprobs", "response_format"},
    Endpoint.COMPLETION: {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "best_of"},
    Endpoint.EMBEDDING: {"input", "encoding_format"},
}


class LineError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def is_unicode(text: str) -> bool:
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
    return (value if is_unicode(value) else _escaped(value)) or None


def _short(value: Any, limit: int = 60) -> str:
    big = isinstance(value, int) and value.bit_length() > 100
    text = f"an integer of {value.bit_length()} bits" if big else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise LineError(ErrorCode.INVALID_REQUEST, f"{name} must be an integer {bounds}, got {_short(value)}")
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high) \
            or not math.isfinite(value):
        raise LineError(ErrorCode.INVALID_REQUEST, f"{name} must be a number from {low} to {high}, got {_short(value)}")
    return float(value)


def _check_fields(body: dict, kind: str) -> None:
    for name, value in body.items():
        if name in FIELDS[kind] or name in IGNORED or value is None:
            continue
        if name in DEFAULTS:
            if value == DEFAULTS[name] or (name == "best_of" and value == body.get("n", 1)):
                continue
            raise LineError(ErrorCode.UNSUPPORTED_PARAMETER, f"{name}: only its default ({dumps(DEFAULTS[name])}) is "
                                                     f"supported, got {dumps(value)}")
        raise LineError(ErrorCode.UNSUPPORTED_PARAMETER, f"{name} is not supported by persimmon-batch's {kind} endpoint")


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError(ErrorCode.INVALID_REQUEST, f"{where}.content: only text parts are supported, got "
                                                   f"{dumps(part)[:100]}")
            parts.append(part["text"])
        return "".join(parts)
    raise LineError(ErrorCode.INVALID_REQUEST, f"{where}.content must be a string or a list of text parts")


def chat_prompt(messages: Any) -> str:
    """The Persimmon chat prompt of OpenAI chat messages (see the module's docstring)."""
    if not isinstance(messages, list) or not messages:
        raise LineError(ErrorCode.INVALID_REQUEST, "messages must be a non-empty list")
    system, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise LineError(ErrorCode.INVALID_REQUEST, f"{where} must be an object")
        role = message.get("role")
        text = _content(message, where)
        if role in ("system", "developer"):
            if turns:
                raise LineError(ErrorCode.INVALID_REQUEST, f"{where}: a {role} message must come before the conversation")
            system.append(text)
        elif role == "user":
            turns.append(f"human: {text}")
        elif role == "assistant":
            turns.append(f"adept: {text}")
        else:
            raise LineError(ErrorCode.INVALID_REQUEST, f"{where}.role {_short(role)} is not supported (system, developer, "
                                               "user, assistant)")
    if not turns:
        raise LineError(ErrorCode.INVALID_REQUEST, "messages hold no user message")
    head = "".join(f"{s}\n\n" for s in system)
    return head + "\n\n".join(turns) + "\n\nadept:"


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, source: str):
    from persimmon.grammar import Grammar, GrammarError

    try:
        grammar = Grammar.json_schema(source) if kind == "json_schema" else Grammar(kind, source)
        grammar.check()
    except GrammarError as exc:
        raise LineError(ErrorCode.INVALID_REQUEST, f"response_format: {one_line(exc)}") from None
    return grammar


def response_grammar(value: Any):
    """The grammar of a chat line's response_format (None for text)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LineError(ErrorCode.INVALID_REQUEST, "response_format must be an object")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _grammar("json_schema", '{"type":"object","additionalProperties":true}')
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise LineError(ErrorCode.INVALID_REQUEST, "response_format.json_schema.schema must be a JSON schema object")
        return _grammar("json_schema", dumps(schema))
    raise LineError(ErrorCode.INVALID_REQUEST, f"response_format.type {_short(kind)} is not supported (text, json_object, "
                                       "json_schema)")


@dataclass
class Line:
    number: int
    custom_id: str | None
    kind: Endpoint | None = None
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
    error: tuple[ErrorCode, str] | None = None  # (code, message): the line cannot be served

    @property
    def needs_vocabulary(self) -> bool:
        """A grammar to follow or log-probabilities to write: the model's vocabulary as bytes is needed."""
        return self.params is not None and (self.params.grammar is not None or self.logprobs is not None)


class RequestParser:
    """The lines of one file (a stream): each parsed on its own, custom_ids unique across them."""

    def __init__(self, tokenizer, options, window: int) -> None:
        self.tokenizer, self.options, self.window = tokenizer, options, window
        self.seen: dict[str, int] = {}  # custom_id -> its line, over one stream (one input file)

    def reset(self) -> None:
        self.seen = {}

    def parse(self, number: int, raw: bytes | str | None) -> Line:
        """One line read, checked and tokenized; anything that goes wrong is that line's `error`."""
        line = Line(number, None)
        try:
            self._parse_into(line, raw)
        except LineError as exc:
            line.error = (exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 -- one line's failure of any kind stays that line's
            line.error = (ErrorCode.INVALID_REQUEST, f"line {number} could not be served: {one_line(exc, 300, with_type=True)}")
        return line

    def _claim(self, line: Line, custom_id: str | None) -> bool:
        """Give the line its custom_id unless an earlier line of the file named it: each custom_id is in the
        output once, on the first line's record (a line that cannot be read keeps the one it names, so a later
        line with that id is a duplicate). False where an earlier line has it."""
        if custom_id is None:
            return True
        if custom_id in self.seen:
            return False
        self.seen[custom_id] = line.number
        line.custom_id = custom_id
        return True

    def _parse_into(self, line: Line, raw: bytes | str | None) -> None:
        where = f"line {line.number}"
        if raw is not None and len(raw) > MAX_LINE_BYTES:
            raise LineError(ErrorCode.LINE_TOO_LARGE, f"{where} is longer than the {MAX_LINE_BYTES:,} bytes a line may have")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._claim(line, _custom_id_of(raw.decode("utf-8", "replace")))
                raise LineError(ErrorCode.INVALID_UTF8, f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            request = json.loads(raw or "", parse_int=_integer)
        except json.JSONDecodeError as exc:
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError(ErrorCode.INVALID_JSON, f"{where} is not JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError(ErrorCode.INVALID_JSON, f"{where} is JSON nested too deep to read") from None
        except ValueError as exc:  # an integer past the digit limit (_integer), or what else json refuses
            self._claim(line, _custom_id_of(raw or ""))
            raise LineError(ErrorCode.INVALID_JSON, f"{where} holds {exc}" if isinstance(exc, _HugeInteger) else
                            f"{where} is not JSON we can read ({one_line(exc, 300, with_type=True)})") from None
        if not isinstance(request, dict):
            raise LineError(ErrorCode.INVALID_REQUEST, f"{where} is a JSON {type(request).__name__}, not a request object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise LineError(ErrorCode.MISSING_CUSTOM_ID, f"{where} has no custom_id (a non-empty string)")
        custom_id = custom_id if is_unicode(custom_id) else _escaped(custom_id)
        if not self._claim(line, custom_id):  # its record has no custom_id: the earlier line's record has it
            raise LineError(ErrorCode.DUPLICATE_CUSTOM_ID, f"{where}: custom_id {_short(custom_id)} was used before, on line "
                                                   f"{self.seen[custom_id]}")
        if "\\u" in raw and not is_unicode(dumps(request)):  # only a \\u escape can make a lone surrogate
            raise LineError(ErrorCode.INVALID_REQUEST, f"{where} holds a lone surrogate escape (\\ud800-\\udfff): not "
                                               "valid Unicode text")
        method = request.get("method", "POST")
        if method != "POST":
            raise LineError(ErrorCode.INVALID_URL, f"method must be POST, got {_short(method)}")
        url = request.get("url")
        if not isinstance(url, str) or url not in ENDPOINTS:
            raise LineError(ErrorCode.INVALID_URL, f"url {_short(url)} is not served (one of {sorted(ENDPOINTS)})")
        body = request.get("body")
        if not isinstance(body, dict):
            raise LineError(ErrorCode.INVALID_REQUEST, "body must be an object")
        line.kind, line.body = ENDPOINTS[url], body
        _check_fields(body, line.kind)
        if line.kind == Endpoint.EMBEDDING:
            self._parse_embedding(line)
        else:
            self._parse_generation(line)

    def _tokens(self, text: str, where: str, room: int = 0) -> list[int]:
        """The prompt's tokens; a prompt past the window is found on a bounded prefix first (a prompt of
        megabytes is refused without tokenizing it whole)."""
        limit = self.options.prompt_limit(self.window)
        head = (limit + 2) * MAX_CHARS_PER_TOKEN  # a prefix that holds more than `limit` tokens if the text does
        if len(text) > head and len(self.tokenizer.encode(text[:head])) > limit + 1:
            raise LineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"{where} has {len(text):,} characters: more than the "
                                                       f"{limit} tokens the model reads")
        ids = self.tokenizer.encode(text)
        if self.options.max_length is not None and len(ids) > self.options.max_length:
            raise LineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"{where} has {len(ids)} tokens: more than --max-length "
                                                       f"{self.options.max_length}")
        if len(ids) + room > self.window:
            need = f" plus {room} to generate" if room else ""
            raise LineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"{where} has {len(ids)} tokens{need}: past the model's "
                                                       f"window of {self.window}")
        return ids

    def _parse_embedding(self, line: Line) -> None:
        value = line.body.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise LineError(ErrorCode.INVALID_REQUEST, "input must be a non-empty string or a list of them (token arrays "
                                               "are not supported)")
        if len(texts) > MAX_LIST:
            raise LineError(ErrorCode.INVALID_REQUEST, f"input has {len(texts):,} texts: at most {MAX_LIST} per line")
        encoding = line.body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise LineError(ErrorCode.INVALID_REQUEST, f"encoding_format must be float or base64, got {_short(encoding)}")
        line.texts = texts
        line.prompts = [self._tokens(t, f"input[{i}]") for i, t in enumerate(texts)]

    def _parse_generation(self, line: Line) -> None:
        body, kind = line.body, line.kind
        if kind == Endpoint.CHAT:
            prompts = [chat_prompt(body.get("messages"))]
        else:
            value = body.get("prompt")
            prompts = [value] if isinstance(value, str) else value
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise LineError(ErrorCode.INVALID_REQUEST, "prompt must be a string or a list of strings (token arrays are "
                                                   "not supported)")
            if len(prompts) > MAX_LIST:
                raise LineError(ErrorCode.INVALID_REQUEST, f"prompt has {len(prompts):,} prompts: at most {MAX_LIST} per line")
        limit = _int(body, "max_completion_tokens", 1) if kind == Endpoint.CHAT else None
        limit = limit if limit is not None else _int(body, "max_tokens", 1)
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise LineError(ErrorCode.INVALID_REQUEST, f"seed must be a 64-bit integer, got {_short(seed)}")
        line.n = _int(body, "n", 1, MAX_CHOICES) or 1
        if len(prompts) * line.n > MAX_LIST:
            raise LineError(ErrorCode.INVALID_REQUEST, f"{len(prompts)} prompts x n={line.n} is {len(prompts) * line.n:,} "
                                               f"completions: at most {MAX_LIST} per line")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise LineError(ErrorCode.INVALID_REQUEST, "stop must be a string or a list of up to 4 strings")
        if kind == Endpoint.CHAT:
            stop = [*stop, CHAT_STOP]
            wants = body.get("logprobs")
            if wants not in (None, True, False):
                raise LineError(ErrorCode.INVALID_REQUEST, f"logprobs must be true or false, got {_short(wants)}")
            top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
            if top is not None and not wants:
                raise LineError(ErrorCode.INVALID_REQUEST, "top_logprobs needs logprobs: true")
            line.logprobs = (top or 0) if wants else None
            grammar = response_grammar(body.get("response_format"))
        else:
            line.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
            grammar = None
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
