"""What a generated row asks for and how it ends: sampling parameters, the per-row random draws, the
choice of the next token, stop strings and finish reasons. Defined once; the engine applies them per row.

A row's randomness comes from its own generator, seeded by (seed, row key) -- by default the row key is its
prompt tokens -- so a row's output never depends on its batch-mates, the batch size, the row order or how a
job was split over actors.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

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


def row_uniforms(seed: int, steps: int) -> list[float]:
    """A row's `steps` uniforms in [0, 1), from its own generator."""
    return torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()


def _sample_group(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    if params.greedy or uniforms is None:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first token whose cdf exceeds u, so zero-probability tokens are never chosen
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float | None]) -> torch.Tensor:
    """The next token of each row from logits (B, V) under the row's own parameters: argmax when greedy, else
    inverse-CDF sampling with the row's uniform over its temperature-scaled, top-k and top-p filtered
    distribution. Rows with equal filters are sampled in one batched call."""
    if not params:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.filters, []).append(i)
    if len(groups) == 1:  # the common case: one set of filters for the whole step, no gather
        u = None if params[0].greedy else torch.tensor(uniforms, dtype=torch.float64, device=logits.device)
        return _sample_group(logits, params[0], u)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows in groups.values():
        p = params[rows[0]]
        u = None if p.greedy else torch.tensor([uniforms[i] for i in rows], dtype=torch.float64, device=logits.device)
        index = torch.tensor(rows, device=logits.device)
        out[index] = _sample_group(logits[index], p, u)
    return out


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
