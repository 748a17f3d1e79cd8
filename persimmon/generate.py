"""Batched generation: left-padded prefill, one KV cache preallocated for the whole batch, small decode steps.

A left-padded row gives the tokens it would give alone: positions come from the attention mask, the mask
keeps pads out of attention, and sampling randomness is drawn per row from a generator seeded by
(seed, row key) -- by default the row key is a hash of the row's prompt tokens -- so a row's output never
depends on its batch-mates, the batch size, the row order or how a job was split over actors.

The prompts are prefilled in groups of similar length (padding costs little) and each row's keys and values
are placed in the batch's left-padded cache. Rows stop at EOS, at a stop string (the completion text is cut
exactly before it) or at max_new_tokens; finished rows leave the batch at once, so they stop costing compute.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cache import KVCache

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
FINISH_NONFINITE = "nonfinite"  # the model's logits for the row were NaN or infinite
STATIC_CAPACITY_STEP = 256  # the compiled decode step's cache capacity is a multiple of this


@dataclass
class SamplingParams:
    """temperature 0 (or do_sample False) is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, T + generated): left-padded prompts, new tokens, pad after a row's last token
    tokens: list[list[int]]  # each row's new tokens, up to and including its EOS / stop-completing token
    finish_reasons: list[str]  # "eos" | "stop" | "length" | "nonfinite"
    texts: list[str] | None = None  # completions without EOS, cut before any stop string (needs a decoder)
    prompt_lengths: list[int] | None = None  # real (unpadded) prompt tokens per row


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (left padding); already left-padded input is returned as is."""
    mask = attention_mask.bool()
    T = mask.shape[1]
    lengths = mask.sum(-1)
    # left-padded <=> in every row the real tokens are exactly the last `length` positions
    expected = torch.arange(T, device=mask.device)[None] >= (T - lengths)[:, None]
    if torch.equal(mask, expected):
        return input_ids, attention_mask
    ids = torch.full_like(input_ids, pad_id)
    for i in range(ids.shape[0]):
        row = input_ids[i][mask[i]]
        if len(row):
            ids[i, T - len(row):] = row
    return ids, expected.long()


def row_seed(seed: int, key: Sequence[int] | bytes) -> int:
    """A 63-bit seed from (seed, row key); a key of token ids is hashed as little-endian int64s."""
    if not isinstance(key, bytes):
        key = b"".join(int(t).to_bytes(8, "little", signed=True) for t in key)
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seeds(seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_keys: Sequence | None) -> list[int]:
    """One seed per row from (seed, row key); the default key is the row's real prompt tokens."""
    return [row_seed(seed, repr(row_keys[i]).encode() if row_keys is not None
                     else input_ids[i][attention_mask[i].bool()].tolist())
            for i in range(input_ids.shape[0])]


def row_uniforms(seeds: list[int], steps: int, device) -> torch.Tensor:
    """(B, steps) uniforms in [0, 1), row i drawn from its own generator: independent of the batch."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.empty(0, steps, dtype=torch.float64, device=device)


def sample(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when greedy, else inverse-CDF sampling with the row's
    uniform over the temperature-scaled, top-k and top-p filtered distribution."""
    if params.greedy or uniforms is None:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
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


def length_groups(lengths: Sequence[int], max_waste: float = 0.25, max_tokens: int = 16384) -> list[list[int]]:
    """Split row indices into groups of similar length: each group's padded size (rows x longest) stays within
    (1 + max_waste) x its real tokens and within max_tokens (a single longer row still gets a group)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups:
            padded = (len(groups[-1]) + 1) * lengths[i]  # sorted ascending: row i is the group's longest
            if padded <= (1 + max_waste) * (real + lengths[i]) and padded <= max_tokens:
                groups[-1].append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def read_windows(sorted_lengths: Sequence[int], prompt_width: int) -> list[tuple[int, int, int]]:
    """Decode-step read windows for a left-padded cache whose rows are sorted by prompt length (ascending):
    contiguous row ranges of similar length, each reading keys from its longest row's first real position."""
    return [(g[0], g[-1] + 1, prompt_width - sorted_lengths[g[-1]])
            for g in length_groups(sorted_lengths, max_waste=0.5, max_tokens=1 << 62)]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run left-padded prompts (B, T) through the model in length groups, placing each row's keys/values at
    its left-padded positions of `cache`; returns the last position's logits (B, V)."""
    B, T = input_ids.shape
    lengths = attention_mask.sum(-1).tolist()
    logits = None
    for group in length_groups(lengths):
        width = max(lengths[i] for i in group)
        rows = torch.tensor(group, device=input_ids.device)
        part = KVCache.for_model(model.config, len(group), width, cache.keys[0].dtype, input_ids.device)
        out = model(input_ids[rows, T - width:], attention_mask=attention_mask[rows, T - width:],
                    past_key_values=part, logits_to_keep=1).logits[:, -1]
        if logits is None:
            logits = out.new_empty(B, out.shape[-1])
        logits[rows] = out
        cache.write_rows(rows, T - width, part)
    cache.advance(T)
    return logits


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


def _decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: KVCache):
    """One token per row over a static cache: every shape is fixed, so it compiles to one graph per batch size."""
    return model(tokens, attention_mask=key_mask, position_ids=positions, past_key_values=cache,
                 logits_to_keep=1).logits[:, -1]


@functools.cache
def compiled_decode_step():
    """The decode step under torch.compile; on CUDA "reduce-overhead" replays it as a CUDA graph."""
    return torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    sampling: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    row_keys: Sequence | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
) -> GenerationOutput:
    """Generate up to max_new_tokens for each row of a (left- or right-) padded batch.

    eos_token_id: None -> the model config's; stop: strings that end a completion (needs `decode`, ids -> text);
    row_keys: per-row keys for the sampling seed (default: the prompt's tokens).
    compile: decode with the compiled static-shape step (CUDA graphs on GPU). None -> on for CUDA, off on CPU,
    where it measured slower (bench/bench_generate.py --compile). With it, finished rows stay in the batch
    (shapes must not change) but are no longer recorded.
    """
    sampling = sampling or SamplingParams()
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop and decode is None:
        raise ValueError("stop strings need a decode function (token ids -> text)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    config = model.config
    device = model.device
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0))
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every row needs at least one real token (a row of the attention mask is all zeros)")
    input_ids, attention_mask = left_align(input_ids, attention_mask, pad)
    B, T = input_ids.shape
    prompt_lengths = attention_mask.sum(-1).tolist()
    # work on rows sorted by prompt length, so rows of similar length are neighbours (see read_windows)
    order = sorted(range(B), key=lambda i: prompt_lengths[i])
    tokens: list[list[int]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    stopper = StopChecker(stop, decode) if stop else None

    uniforms = None
    if not sampling.greedy and max_new_tokens:
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        uniforms = row_uniforms(row_seeds(seed, input_ids, attention_mask, row_keys), max_new_tokens, device)[order]

    if max_new_tokens:
        present = order  # original row index of each row in the working batch
        index = torch.tensor(order, device=device)
        work_ids, work_mask = input_ids[index], attention_mask[index]
        static = compile if compile is not None else device.type == "cuda"
        capacity = T + max_new_tokens
        if static:  # few distinct cache shapes -> few graphs to compile and capture
            capacity = -(-capacity // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
        cache = KVCache.for_model(config, B, capacity, model.dtype, device)
        mask = torch.zeros(B, capacity, dtype=torch.long, device=device)
        mask[:, :T] = work_mask
        positions = work_mask.sum(-1, keepdim=True)  # (B, 1): the next token's position
        logits = prefill(model, work_ids, work_mask, cache)
        if static:
            cache.make_static(T)
            key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, capacity)
            step_fn = compiled_decode_step()
        else:
            cache.read_windows = read_windows([prompt_lengths[r] for r in present], T)
        for step in range(max_new_tokens):
            next_tokens = sample(logits, sampling, None if uniforms is None else uniforms[:, step])
            # a row whose logits are not finite (a corrupt weight) ends flagged instead of emitting noise
            next_tokens = torch.where(torch.isfinite(logits).all(dim=-1), next_tokens, -1)
            for j, tok in enumerate(next_tokens.tolist()):
                row = present[j]
                if finish[row] is not None:  # a finished row kept in a static batch
                    continue
                if tok < 0:
                    finish[row] = FINISH_NONFINITE
                    continue
                tokens[row].append(tok)
                if tok in eos_ids:
                    finish[row] = FINISH_EOS
                elif stopper is not None and stopper.hit(tokens[row]):
                    finish[row] = FINISH_STOP
                elif len(tokens[row]) == max_new_tokens:
                    finish[row] = FINISH_LENGTH
            keep = [j for j, row in enumerate(present) if finish[row] is None]
            if not keep:
                break
            next_tokens = next_tokens.clamp(min=0)
            if static:
                key_mask[:, 0, 0, T + step] = True
                cache.write_index.fill_(T + step)
                logits = step_fn(model, next_tokens[:, None], positions, key_mask, cache)
                positions = positions + 1
                continue
            if len(keep) < len(present):  # finished rows leave the batch and stop costing compute
                index = torch.tensor(keep, device=device)
                cache.select_rows(index)
                mask, positions, next_tokens = mask[index], positions[index], next_tokens[index]
                uniforms = None if uniforms is None else uniforms[index]
                present = [present[j] for j in keep]
                cache.read_windows = read_windows([prompt_lengths[r] for r in present], T)
            mask[:, T + step] = 1
            logits = model(next_tokens[:, None], attention_mask=mask[:, : T + step + 1], position_ids=positions,
                           past_key_values=cache, logits_to_keep=1).logits[:, -1]
            positions = positions + 1

    for row in range(B):
        if finish[row] is None:
            finish[row] = FINISH_LENGTH  # max_new_tokens == 0
    width = max((len(t) for t in tokens), default=0)
    sequences = torch.full((B, T + width), pad, dtype=torch.long, device=device)
    sequences[:, :T] = input_ids
    for row, toks in enumerate(tokens):
        if toks:
            sequences[row, T : T + len(toks)] = torch.tensor(toks, device=device)
    texts = None
    if decode is not None:
        texts = []
        for row, toks in enumerate(tokens):
            text = decode([t for t in toks if t not in eos_ids])
            texts.append(stopper.cut(text) if stopper is not None and finish[row] == FINISH_STOP else text)
    return GenerationOutput(sequences, tokens, [str(f) for f in finish], texts, prompt_lengths)
