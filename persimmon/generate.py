"""generate(): a padded batch of prompts in, their continuations out -- a thin front over GenerationEngine.

Each row of the batch becomes one engine request (its real tokens, whatever the padding side), so a row
gives the tokens it would give alone: the engine's positions and masks are per row and sampling draws
from the row's own generator seeded by (seed, row key), the key being the row's prompt tokens by default.
Rows stop at EOS, at a stop string (the completion text is cut exactly before it), when their grammar is
complete or at max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .sampling import FinishReason, SamplingParams, StopChecker, TokenLogprob, row_seed, row_uniforms, sample

__all__ = ["FinishReason", "GenerationOutput", "SamplingParams", "StopChecker", "generate", "left_align",
           "row_seed", "row_uniforms", "sample"]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, T + generated): left-padded prompts, new tokens, pad after a row's last token
    tokens: list[list[int]]  # each row's new tokens, up to and including its EOS / stop-completing token
    finish_reasons: list[FinishReason]  # compare equal to "eos" | "stop" | "length" | "nonfinite"
    texts: list[str] | None = None  # completions without EOS, cut before any stop string (needs a decoder)
    prompt_lengths: list[int] | None = None  # real (unpadded) prompt tokens per row
    logprobs: list[list[TokenLogprob] | None] | None = None  # per row, when sampling.logprobs is set
    errors: list[str | None] | None = None  # per row: e.g. "incomplete structured output"


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
    vocabulary=None,
    token_budget: int = 1 << 16,
) -> GenerationOutput:
    """Generate up to max_new_tokens for each row of a (left- or right-) padded batch.

    eos_token_id: None -> the model config's; stop: strings that end a completion (needs `decode`, ids -> text);
    row_keys: per-row keys for the sampling seed (default: the prompt's tokens). sampling may carry stop,
    logprobs and a grammar too (a grammar or logprobs need `vocabulary`, a persimmon.grammar.Vocabulary).
    compile: the engine's compiled decode step (CUDA graphs on GPU); None -> on for CUDA.
    """
    from .engine import GenerationEngine, Request

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop and decode is None:
        raise ValueError("stop strings need a decode function (token ids -> text)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    config = model.config
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0))
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every row needs at least one real token (a row of the attention mask is all zeros)")
    input_ids, attention_mask = left_align(input_ids.cpu(), attention_mask.cpu(), pad)
    B, T = input_ids.shape
    prompts = [input_ids[i][attention_mask[i].bool()].tolist() for i in range(B)]
    done = {}
    if max_new_tokens:
        engine = GenerationEngine(model, max_new_tokens, sampling, eos_token_id=eos_token_id, stop=stop,
                                  decode=decode, token_budget=token_budget, max_slots=B, pad_token_id=pad,
                                  compile=compile, vocabulary=vocabulary)
        keys = [None if row_keys is None else repr(row_keys[i]).encode() for i in range(B)]
        done = {c.key: c for c in engine.run(Request(i, prompts[i], seed_key=keys[i]) for i in range(B))}
    tokens = [done[i].tokens if i in done else [] for i in range(B)]
    width = max((len(t) for t in tokens), default=0)
    sequences = torch.full((B, T + width), pad, dtype=torch.long)
    sequences[:, :T] = input_ids
    for row, toks in enumerate(tokens):
        if toks:
            sequences[row, T : T + len(toks)] = torch.tensor(toks)
    rows = [done.get(i) for i in range(B)]
    return GenerationOutput(
        sequences.to(model.device), tokens,
        [c.finish_reason if c else FinishReason.LENGTH for c in rows],
        None if decode is None else [c.text if c else "" for c in rows],
        [len(p) for p in prompts],
        [c.logprobs if c else None for c in rows],
        [c.error if c else None for c in rows])
