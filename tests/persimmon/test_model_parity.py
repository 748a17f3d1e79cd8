"""Our Persimmon against transformers' on the same saved checkpoint: logits, pooling, cache, losses."""

from __future__ import annotations

import pytest
import torch

from persimmon import KVCache, PersimmonForCausalLM, PersimmonForSequenceClassification, PersimmonModel
from tests.conftest import TINY, build_hf_model

ATOL = 1e-5

VARIANTS = {
    "default": {},
    "full-rotary": {"partial_rotary_factor": 1.0},
    "no-qk-layernorm": {"qk_layernorm": False},
    "linear-rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic-rope": {"rope_scaling": {"type": "dynamic", "factor": 3.0}},
    "theta-10000": {"rope_theta": 10000.0},
}


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def reset_hf_rope(model) -> None:
    """transformers' dynamic rope keeps the longest length it saw; one short forward resets it."""
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random token ids, never 0: tests pad with id 0, and the reference pools on the last id != pad."""
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_lm_logits_match(tmp_path, variant):
    hf = build_hf_model(tmp_path, "causal", **VARIANTS[variant])
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    # past max_position_embeddings (48) so the scaled variants are exercised where they differ
    for length in (7, 40, 70):
        ids = random_ids(2, length)
        reset_hf_rope(hf)
        with torch.no_grad():
            close(ours(ids).logits, hf(ids).logits)


def test_hidden_states_and_attentions_match(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 11)
    with torch.no_grad():
        theirs = hf(ids, output_hidden_states=True, output_attentions=True)
        mine = ours(ids, output_hidden_states=True, output_attentions=True)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == TINY["num_hidden_layers"] + 1
    for a, b in zip(mine.hidden_states, theirs.hidden_states):
        close(a, b)
    assert len(mine.attentions) == TINY["num_hidden_layers"]
    for a, b in zip(mine.attentions, theirs.attentions):
        close(a, b)
    close(mine.logits, theirs.logits)


def test_base_model_matches(tmp_path):
    hf = build_hf_model(tmp_path, "base")
    ours = PersimmonModel.from_pretrained(tmp_path)
    ids = random_ids(3, 9)
    with torch.no_grad():
        close(ours(ids).last_hidden_state, hf(ids).last_hidden_state)


def test_base_model_loads_from_causal_checkpoint(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    ours = PersimmonModel.from_pretrained(tmp_path)
    ids = random_ids(1, 9)
    with torch.no_grad():
        close(ours(ids).last_hidden_state, hf.model(ids).last_hidden_state)


def test_inputs_embeds_equal_input_ids(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 9)
    embeds = ours.model.embed_tokens(ids)
    with torch.no_grad():
        close(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=embeds)


# -- padding ------------------------------------------------------------------------------------------------

def padded_batch(lengths: list[int], side: str, pad_id: int = 0, seed: int = 3):
    """Rows of the given lengths padded to the longest on `side`; returns (ids, mask, rows)."""
    rows = [random_ids(1, n, seed + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask, rows


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_padded_rows_equal_rows_alone(tmp_path, side):
    hf = build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids, mask, rows = padded_batch([5, 13, 9], side)
    with torch.no_grad():
        batch_logits = ours(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            real = mask[i].bool()
            close(batch_logits[i, real], hf(row[None]).logits[0])
        # and against transformers' own batched forward given the same positions
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        close(batch_logits[mask.bool()], theirs[mask.bool()])


@pytest.mark.parametrize("case", ["left", "right", "none", "pad-none"])
def test_sequence_classification_matches(tmp_path, case):
    pad_id = None if case == "pad-none" else 0
    hf = build_hf_model(tmp_path, "seqcls", num_labels=3, pad_token_id=pad_id)
    ours = PersimmonForSequenceClassification.from_pretrained(tmp_path)
    lengths = [12, 12, 12] if case == "none" else [4, 12, 1, 9]
    side = "left" if case in ("left", "pad-none") else "right"
    # pad id 0 must not occur inside a row for the reference's ids-based pooling; ours uses the mask
    ids, mask, rows = padded_batch(lengths, side, pad_id=pad_id or 0)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
        assert mine.shape == (len(rows), 3)
        for i, row in enumerate(rows):  # each row alone through the reference
            close(mine[i], hf(row[None]).logits[0])
        if case in ("right", "none"):  # transformers' own batched path agrees where its pooling is valid
            close(mine, hf(ids, attention_mask=mask).logits)


def test_sequence_classification_pools_from_ids_without_mask(tmp_path):
    hf = build_hf_model(tmp_path, "seqcls", num_labels=2, pad_token_id=0)
    ours = PersimmonForSequenceClassification.from_pretrained(tmp_path)
    ids, _, rows = padded_batch([6, 10], "right", pad_id=0)
    with torch.no_grad():
        close(ours(ids).logits, hf(ids).logits)


def test_sequence_classification_without_pad_id_needs_mask(tmp_path):
    build_hf_model(tmp_path, "seqcls", num_labels=2, pad_token_id=None)
    ours = PersimmonForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no pad_token_id; pass attention_mask"):
        ours(random_ids(2, 5))
    assert ours(random_ids(1, 5)).logits.shape == (1, 2)


def test_dynamic_rope_row_independent_of_batch(tmp_path):
    hf = build_hf_model(tmp_path, "causal", rope_scaling={"type": "dynamic", "factor": 2.0})
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids, mask, rows = padded_batch([30, 75, 60], "left")  # max_position_embeddings is 48
    with torch.no_grad():
        batch_logits = ours(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            reset_hf_rope(hf)
            close(batch_logits[i, mask[i].bool()], hf(row[None]).logits[0])


# -- KV cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["default", "full-rotary", "no-qk-layernorm", "linear-rope"])
def test_incremental_decoding_equals_full_forward(tmp_path, variant):
    hf = build_hf_model(tmp_path, "causal", **VARIANTS[variant])
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = ours(ids).logits
        close(full, hf(ids).logits)
        out = ours(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        assert isinstance(cache, KVCache) and cache.length == 8
        for t in range(8, 20):
            out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert cache.length == 20
    close(torch.cat(steps, dim=1), full)


def test_incremental_decoding_left_padded(tmp_path):
    build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids, mask, _ = padded_batch([6, 14, 10], "left")
    extra = random_ids(3, 5, seed=9)
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask).logits
        cache = KVCache.for_model(ours.config, 3, capacity=full_ids.shape[1], dtype=torch.float32, device="cpu")
        out = ours(ids, attention_mask=mask, past_key_values=cache)
        steps = [out.logits]
        for t in range(extra.shape[1]):
            T = ids.shape[1] + t + 1
            steps.append(ours(extra[:, t : t + 1], attention_mask=full_mask[:, :T], past_key_values=cache).logits)
    got = torch.cat(steps, 1)
    close(got[full_mask.bool()], full[full_mask.bool()])


def test_cache_grows_past_capacity(tmp_path):
    build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(1, 12)
    cache = KVCache.for_model(ours.config, 1, capacity=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        a = ours(ids[:, :6], past_key_values=cache).logits
        b = ours(ids[:, 6:], past_key_values=cache).logits
        close(torch.cat([a, b], 1), ours(ids).logits)
    assert cache.capacity >= 12 and cache.length == 12


# -- losses ------------------------------------------------------------------------------------------------

def test_causal_lm_loss_matches(tmp_path):
    hf = build_hf_model(tmp_path, "causal")
    ours = PersimmonForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        close(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss)


@pytest.mark.parametrize(
    "num_labels,labels,problem",
    [
        (1, torch.tensor([0.5, -1.25]), "regression"),
        (3, torch.tensor([2, 0]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    ],
)
def test_sequence_classification_losses_match(tmp_path, num_labels, labels, problem):
    hf = build_hf_model(tmp_path, "seqcls", num_labels=num_labels, pad_token_id=0)
    ours = PersimmonForSequenceClassification.from_pretrained(tmp_path)
    ids, mask, _ = padded_batch([7, 11], "right")
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels).loss
        assert hf.config.problem_type == problem  # the reference inferred the same problem type
        close(ours(ids, attention_mask=mask, labels=labels).loss, theirs)


# -- reduced precision -------------------------------------------------------------------------------------

# bf16 keeps 8 mantissa bits, fp16 11; errors compound over the layers, so the bound is relative to the
# logits' scale. Measured on this model: bf16 1.1%, fp16 0.12% of the scale (transformers: the same).
REDUCED = {torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", list(REDUCED), ids=str)
def test_reduced_precision_close_to_fp32(tmp_path, dtype):
    hf = build_hf_model(tmp_path, "causal")
    ref = PersimmonForCausalLM.from_pretrained(tmp_path)
    low = PersimmonForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert low.dtype == dtype and low.lm_head.weight.dtype == dtype
    ids, mask, _ = padded_batch([9, 16], "left")
    with torch.no_grad():
        exact = ref(ids, attention_mask=mask).logits
        approx = low(ids, attention_mask=mask).logits
        assert approx.dtype == dtype and torch.isfinite(approx).all()
        scale = exact.abs().max()
        err = (approx.float() - exact)[mask.bool()].abs().max()
        assert err <= REDUCED[dtype] * scale, f"{dtype}: max error {err:.4g} vs logit scale {scale:.4g}"
        # and the same ops in the same dtype as the reference
        hf_low = hf.to(dtype)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf_low(ids, attention_mask=mask, position_ids=positions).logits.float()
        assert (approx.float() - theirs)[mask.bool()].abs().max() <= REDUCED[dtype] * scale
