"""What a generated row asks for and how it ends: sampling parameters, the per-row seed, stop strings, finish
reasons and logprob records. No torch here: the slot scheduler (persimmon.scheduler) and the job driver read
these without loading it; persimmon.sampling draws the tokens.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

MAX_LOGPROBS = 20


class FinishReason(str, enum.Enum):
    """Why a row stopped. A str: it compares equal to (and is written as) its value."""

    EOS = "eos"  # the model produced its end-of-text token
    STOP = "stop"  # a stop string appeared (the completion is cut before it), or the grammar is complete
    LENGTH = "length"  # max_new_tokens reached
    NONFINITE = "nonfinite"  # the model's logits for the row were NaN or infinite (a corrupt weight)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SamplingParams:
    """One row's generation parameters. temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 disable
    those filters; seed None draws a fresh one (a rerun then samples differently). max_new_tokens None:
    the engine's default. stop: strings that end the completion (cut before them). logprobs: None for none,
    K in 0..20 for the chosen token's log-probability and the K likeliest alternatives at each step.
    grammar: a persimmon.grammar.Grammar the completion must match."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    grammar: Any = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def filters(self) -> tuple:
        """What sampling itself depends on: rows equal here are sampled together."""
        return (0.0, 0, 1.0) if self.greedy else (self.temperature, self.top_k, self.top_p)

    def with_defaults(self, max_new_tokens: int) -> "SamplingParams":
        return self if self.max_new_tokens is not None else replace(self, max_new_tokens=max_new_tokens)


def row_seed(seed: int, key: Sequence[int] | bytes) -> int:
    """A 63-bit seed from (seed, row key); a key of token ids is hashed as little-endian int64s."""
    if not isinstance(key, bytes):
        key = b"".join(int(t).to_bytes(8, "little", signed=True) for t in key)
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


class StopChecker:
    """Finds stop strings in a row's completion text as tokens arrive, decoding only a recent window."""

    def __init__(self, stop: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop = [s for s in stop if s]
        self.decode = decode
        # a character is at most 4 byte-fallback tokens; +2 tokens of slack for a piece that straddles it
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 2

    def hit(self, tokens: list[int]) -> bool:
        tail = self.decode(tokens[-self.window:])
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> str:
        """The completion text up to the earliest stop string."""
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(cuts)] if cuts else text


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model's raw distribution, with the K likeliest."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
