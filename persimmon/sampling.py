"""Drawing the next token: each row's own uniforms and the batched choice under per-row parameters.

A row's randomness comes from its own generator, seeded by (seed, row key) -- by default the row key is its
prompt tokens -- so a row's output never depends on its batch-mates, the batch size, the row order or how a
job was split over actors. The parameters themselves (and finish reasons, stop strings) are torch-free, in
persimmon.params; they are re-exported here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .params import (MAX_LOGPROBS, FinishReason, SamplingParams, StopChecker, TokenLogprob,  # noqa: F401
                     row_seed)


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
