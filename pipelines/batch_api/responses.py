"""Records out: a served line's response (chat or text completion, embeddings) or its error, as OpenAI's batch
output writes them, with ids derived from the line (a rerun writes the same ids). Pure: the pipeline hands in
the finished completions or vectors."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import numpy as np

from persimmon import __version__
from persimmon.params import FinishReason

from ..errors import one_line
from .requests import Endpoint, ErrorCode, Line, dumps, is_unicode


def _digest(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _record(value: dict) -> str:
    """An output line: UTF-8 text as it is, or (should any string in it not be valid Unicode) ASCII with escapes,
    so writing it can never fail."""
    text = dumps(value)
    return text if is_unicode(text) else json.dumps(value, ensure_ascii=True, separators=(",", ":"))


class Responses:
    """Writes each line's record. `vocabulary` (the model's, as bytes) is set once a line wants log-probabilities."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.vocabulary = None

    def ids(self, line: Line) -> tuple[str, str, str]:
        digest = _digest(line.custom_id, line.number, dumps(line.body))
        return f"batch_req_{digest}", f"req_{digest}", digest

    def error(self, line: Line, code: ErrorCode, message: str) -> None:
        line.ok = False
        batch_id = f"batch_req_{_digest(line.custom_id, line.number, message)}"
        line.record = _record({"id": batch_id, "custom_id": line.custom_id, "response": None,
                               "error": {"code": code, "message": message}})

    def respond(self, line: Line, body: dict) -> None:
        batch_id, request_id, _ = self.ids(line)
        line.ok = True
        line.record = _record({"id": batch_id, "custom_id": line.custom_id,
                               "response": {"status_code": 200, "request_id": request_id, "body": body},
                               "error": None})

    def completion(self, line: Line) -> None:
        """A generation line's record from its finished completions (finite ones: the pipeline checks)."""
        failed = self.structured_failure(line)
        if failed is not None:
            self.error(line, ErrorCode.STRUCTURED_OUTPUT_FAILED, failed)
            return
        _, _, digest = self.ids(line)
        choices, written = [], 0
        for index, (p, choice) in enumerate(sorted(line.completions)):
            c = line.completions[(p, choice)]
            written += len(c.tokens)
            reason = "length" if c.finish_reason == FinishReason.LENGTH else "stop"
            if line.kind == Endpoint.CHAT:
                choices.append({"index": index, "finish_reason": reason, "logprobs": self.chat_logprobs(c),
                                "message": {"role": "assistant", "content": (c.text or "").lstrip(), "refusal": None}})
            else:
                choices.append({"index": index, "finish_reason": reason, "text": c.text or "",
                                "logprobs": self.completion_logprobs(c, len(line.texts[p]))})
        read = sum(len(ids) for ids in line.prompts)
        body = {"id": f"{'chatcmpl' if line.kind == Endpoint.CHAT else 'cmpl'}-{digest}",
                "object": "chat.completion" if line.kind == Endpoint.CHAT else "text_completion",
                "created": int(time.time()), "model": self.model(line), "choices": choices,
                "usage": {"prompt_tokens": read, "completion_tokens": written, "total_tokens": read + written},
                "system_fingerprint": f"persimmon-batch-{__version__}"}
        self.respond(line, body)

    def structured_failure(self, line: Line) -> str | None:
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
            if self.json_format(line):
                try:
                    json.loads(c.text or "")
                except ValueError as exc:
                    return (f"choice {choice}: the grammar matched, but the text is not JSON "
                            f"({one_line(exc, 300, with_type=True)})")
        return None

    @staticmethod
    def json_format(line: Line) -> bool:
        value = line.body.get("response_format")
        return isinstance(value, dict) and value.get("type") in ("json_object", "json_schema")

    def model(self, line: Line) -> str:
        model = line.body.get("model")
        return model if isinstance(model, str) and model else self.model_name

    def token(self, token: int) -> tuple[str, list[int]]:
        """A token's text (a lone byte as \\xNN) and its exact bytes (OpenAI's `bytes`; none for a control piece)."""
        tokens = self.vocabulary.tokens
        data = tokens[token] if token < len(tokens) else b""
        return self.vocabulary.text(token), [] if data.startswith(b"\xff") else list(data)

    def chat_logprobs(self, c) -> dict | None:
        if c.logprobs is None:
            return None
        content = []
        for t in c.logprobs:
            text, data = self.token(t.id)
            top = [{"token": self.token(i)[0], "logprob": lp, "bytes": self.token(i)[1]} for i, lp in t.top]
            content.append({"token": text, "logprob": t.logprob, "bytes": data, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def completion_logprobs(self, c, offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        tokens, offsets = [], []
        for t in c.logprobs:
            offsets.append(offset)
            text = self.token(t.id)[0]
            tokens.append(text)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in c.logprobs],
                "top_logprobs": [{self.token(i)[0]: lp for i, lp in t.top} for t in c.logprobs],
                "text_offset": offsets}


    def embeddings(self, line: Line, vectors: list[np.ndarray]) -> None:
        """An embeddings line's record from its vectors (finite ones: the pipeline checks)."""
        base64_out = line.body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if base64_out
                 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        read = sum(len(ids) for ids in line.prompts)
        self.respond(line, {"object": "list", "data": data, "model": self.model(line),
                            "usage": {"prompt_tokens": read, "total_tokens": read}})
