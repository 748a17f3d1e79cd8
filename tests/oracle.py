"""A naive generation loop for the tests: one row, no cache, the whole sequence through the model at every
step. Slow and obviously right; the engine (continuous batching, slots, shared prefixes, compiled steps)
must give what it gives."""

from __future__ import annotations

import torch

from persimmon.sampling import FinishReason, SamplingParams, row_seed, row_uniforms, sample


@torch.inference_mode()
def naive_generate(model, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                   eos: int | list[int] | None = None, vocab_limit: int | None = None,
                   allowed=None) -> tuple[list[int], str]:
    """(new tokens, finish reason) for one prompt. allowed: optional callable(tokens so far) -> bool tensor over
    the vocabulary (a grammar's mask, computed by the test's own means)."""
    params = params or SamplingParams()
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    uniforms = None if params.greedy else row_uniforms(row_seed(params.seed, prompt), max_new_tokens)
    ids, out = list(prompt), []
    for step in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=model.device)).logits[:, -1].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if allowed is not None:
            logits[0, ~allowed(out)] = float("-inf")
        token = int(sample(logits, [params], [None if uniforms is None else uniforms[step]])[0])
        out.append(token)
        if token in eos_ids:
            return out, FinishReason.EOS
        ids.append(token)
    return out, FinishReason.LENGTH
