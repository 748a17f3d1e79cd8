"""The continuous-batching engine: rows that join mid-decode give the tokens they give alone (greedy and
sampled), freed slots are reused, a shared prefix changes nothing, the pool grows for a longer row, the
compiled step equals the eager one and is captured once per pool."""

from __future__ import annotations

import os

import pytest
import torch

from persimmon import PersimmonForCausalLM, SamplingParams
from persimmon.engine import GenerationEngine, Request
from tests.conftest import build_hf_model
from tests.oracle import naive_generate

SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    build_hf_model(path, "causal", seed=11, max_position_embeddings=256)
    return PersimmonForCausalLM.from_pretrained(path)


def prompts(n: int = 10, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 384, (length,), generator=gen).tolist()
            for length in torch.randint(2, 60, (n,), generator=gen).tolist()]


def alone(model, rows, new, sampling, eos):
    """Each row through the naive loop: (tokens, finish reason)."""
    return [naive_generate(model, r, new, sampling, eos) for r in rows]


def frequent_token(model, rows, new) -> int:
    """A token the rows really emit early on (as EOS it ends rows at different points)."""
    first = alone(model, rows, new, SamplingParams(), [])
    return first[0][0][3]


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_rows_joining_mid_decode_give_their_tokens_alone(model, sampling):
    rows, new = prompts(), 16
    eos = frequent_token(model, rows, new)
    expected = alone(model, rows, new, sampling, eos)
    # three slots for ten rows: most rows join while others are mid-decode, into slots freed by EOS/length
    engine = GenerationEngine(model, new, sampling, eos_token_id=eos, token_budget=3 * 128)
    done = list(engine.run(Request(i, r) for i, r in enumerate(rows)))
    assert engine.slots == 3 and engine.counters["pools"] == 1
    assert sorted(c.key for c in done) == list(range(len(rows)))
    for c in done:
        assert c.tokens == expected[c.key][0], f"row {c.key}"
        assert c.finish_reason == expected[c.key][1]
        assert c.prompt_tokens == len(rows[c.key])
    assert {"eos", "length"} <= {c.finish_reason for c in done}
    # the same rows in another order, with another budget: the same tokens
    engine = GenerationEngine(model, new, sampling, eos_token_id=eos, token_budget=5 * 128)
    again = {c.key: c.tokens for c in engine.run(Request(i, rows[i]) for i in reversed(range(len(rows))))}
    assert again == {c.key: c.tokens for c in done}


def test_many_rows_sorted_and_read_in_ranges_give_their_tokens_alone(model):
    """More rows than one attention range (CHUNK_ROWS): rows admitted mid-decode unsort the slots, the engine
    re-sorts them (moving their keys and values) and reads each range only to its longest row; every row still
    gets its own tokens."""
    gen = torch.Generator().manual_seed(3)
    short, long = ([[1] + torch.randint(3, 384, (n,), generator=gen).tolist() for n in range(lo, lo + 40)]
                   for lo in (2, 150))
    rows, new = short + short + long, 40  # the long rows wait for slots the short ones free
    eos = frequent_token(model, rows, new)
    expected = alone(model, rows, new, SAMPLED, eos)
    engine = GenerationEngine(model, new, SAMPLED, eos_token_id=eos, token_budget=72 * 256)
    done = {c.key: c for c in engine.run(Request(i, r) for i, r in enumerate(rows))}
    assert engine.slots == 72 and engine.counters["sorts"] >= 1
    assert {k: (c.tokens, c.finish_reason) for k, c in done.items()} == dict(enumerate(expected))


def test_each_request_brings_its_own_parameters(model):
    """Greedy and differently sampled rows with their own lengths share the decode steps; each gives what it
    gives alone under its own parameters."""
    rows = prompts(9, seed=5)
    mix = [SamplingParams(), SAMPLED, SamplingParams(temperature=1.3, seed=3, max_new_tokens=5),
           SamplingParams(temperature=0.7, top_k=5, seed=9, max_new_tokens=14)]
    params = [mix[i % len(mix)] for i in range(len(rows))]
    expected = [naive_generate(model, r, p.max_new_tokens or 10, p, []) for r, p in zip(rows, params)]
    engine = GenerationEngine(model, 10, eos_token_id=[], token_budget=4 * 128)
    done = {c.key: c for c in engine.run(Request(i, r, params[i]) for i, r in enumerate(rows))}
    for i, (tokens, finish) in enumerate(expected):
        assert done[i].tokens == tokens and done[i].finish_reason == finish, f"row {i}"
    assert {len(done[i].tokens) for i in range(len(rows))} == {5, 10, 14}


def test_a_shared_prefix_changes_no_token(model):
    prefix = [1] + list(range(50, 90))
    rows = [prefix + r[1:] for r in prompts(6, seed=1)] + [[1, 5, 6, 7]]  # the last row does not share it
    expected = alone(model, rows, 10, SAMPLED, [])
    engine = GenerationEngine(model, 10, SAMPLED, eos_token_id=[], token_budget=4 * 128, prefix_ids=prefix)
    got = {c.key: c.tokens for c in engine.run(Request(i, r) for i, r in enumerate(rows))}
    assert got == {i: e[0] for i, e in enumerate(expected)}
    assert engine.counters["prefix_prefills"] == 1 and engine.counters["prefix_tokens_shared"] == 6 * len(prefix)


def test_the_pool_grows_for_a_longer_row(model):
    rows = prompts(4, seed=2) + [[1] + list(range(10, 200))]  # a row longer than the first pool's slots
    expected = alone(model, rows, 8, SamplingParams(), [])
    engine = GenerationEngine(model, 8, token_budget=1024)
    for i, r in enumerate(rows[:4]):
        engine.add(Request(i, r))
    got = {c.key: c.tokens for c in engine.step()}
    capacity = engine.pool.capacity
    engine.add(Request(4, rows[4]))
    while engine.busy:
        got.update({c.key: c.tokens for c in engine.step()})
    assert engine.pool.capacity > capacity and engine.counters["pools"] == 2
    assert got == {i: e[0] for i, e in enumerate(expected)}


def test_ids_past_the_vocabulary_limit_are_never_produced(model):
    rows = prompts(4, seed=3)
    with torch.no_grad():
        saved = model.lm_head.weight[300:].clone()
        model.lm_head.weight[300:] *= 50  # the padded ids would win every argmax
    try:
        for sampling in (SamplingParams(), SAMPLED):
            engine = GenerationEngine(model, 12, sampling, eos_token_id=[], vocab_limit=300)
            for c in engine.run(Request(i, r) for i, r in enumerate(rows)):
                assert c.tokens and max(c.tokens) < 300
    finally:
        with torch.no_grad():
            model.lm_head.weight[300:] = saved


def test_compiled_step_equals_eager_and_is_captured_once_per_pool(model):
    from torch._dynamo.utils import counters

    rows, new = prompts(6, seed=4), 10
    eos = frequent_token(model, rows, new)
    eager = GenerationEngine(model, new, SAMPLED, eos_token_id=eos, token_budget=3 * 128)
    expected = {c.key: c.tokens for c in eager.run(Request(i, r) for i, r in enumerate(rows))}
    compiled = GenerationEngine(model, new, SAMPLED, eos_token_id=eos, token_budget=3 * 128, compile=True)
    assert {c.key: c.tokens for c in compiled.run(Request(i, r) for i, r in enumerate(rows))} == expected
    graphs = counters["stats"]["unique_graphs"]
    # a second call on the same pool replays what was compiled: no new graph
    assert {c.key: c.tokens for c in compiled.run(Request(i, r) for i, r in enumerate(rows))} == expected
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_pool_is_sized_by_bytes(model):
    """kv_cache_bytes buys positions at the model's cost per position: the slots are what those bytes hold for
    rows of the longest length (capped at max_slots), and the rows still give their tokens alone."""
    from persimmon.engine import SlotPool

    rows = prompts(10, seed=6)
    per_position = SlotPool.bytes_per_position(model.config, model.dtype)
    assert per_position == 2 * model.config.num_hidden_layers * model.config.hidden_size * 4
    expected = alone(model, rows, 6, SamplingParams(), [])
    engine = GenerationEngine(model, 6, eos_token_id=[], kv_cache_bytes=3 * 128 * per_position + per_position - 1)
    got = {c.key: c.tokens for c in engine.run(Request(i, r) for i, r in enumerate(rows))}
    capacity = -(-max(len(r) + 6 for r in rows) // 64) * 64  # the longest row, in steps of 64 positions
    assert engine.pool.capacity == capacity and engine.slots == (3 * 128) // capacity > 1
    assert got == {i: e[0] for i, e in enumerate(expected)}
    roomy = GenerationEngine(model, 6, eos_token_id=[], kv_cache_bytes=1 << 30, max_slots=7)
    list(roomy.run(Request(i, r) for i, r in enumerate(rows)))
    assert roomy.slots == 7
    with pytest.raises(ValueError, match="holds no position"):
        GenerationEngine(model, 6, kv_cache_bytes=per_position - 1)


def test_bf16_computed_in_fp32_matches_bf16_and_caches_fp32(tmp_path):
    """Forced on (whatever this CPU has): a bf16 model's linear layers hold fp32 copies of the same values,
    attention runs over an fp32 cache, outputs stay bf16 and agree with the plain bf16 model to bf16 rounding,
    and greedy generation equals the naive loop on the converted model."""
    from persimmon.cpu import compute_bf16_linears_in_fp32

    build_hf_model(tmp_path, "causal", seed=5, max_position_embeddings=128)
    plain = PersimmonForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    fitted = PersimmonForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert compute_bf16_linears_in_fp32(fitted, force=True)
    assert fitted.lm_head.weight.dtype == torch.float32 and fitted.dtype == torch.bfloat16
    assert torch.equal(fitted.lm_head.weight, plain.lm_head.weight.float())
    assert fitted.kv_dtype == torch.float32 and plain.kv_dtype == torch.bfloat16
    ids = torch.tensor(prompts(3, seed=7)[0])[None]
    with torch.inference_mode():
        a, b = plain(ids).logits, fitted(ids).logits
        reference = PersimmonForCausalLM.from_pretrained(tmp_path, dtype="float32")(ids).logits
    assert b.dtype == torch.bfloat16
    # both are bf16 renderings of the fp32 model: the fitted one no further from it than plain bf16 (x1.5)
    assert (b.float() - reference).abs().max() <= 1.5 * (a.float() - reference).abs().max() + 1e-2
    rows = prompts(5, seed=8)
    engine = GenerationEngine(fitted, 8, eos_token_id=[], token_budget=4 * 128)
    got = {c.key: c.tokens for c in engine.run(Request(i, r) for i, r in enumerate(rows))}
    assert engine.pool.keys[0].dtype == torch.float32
    assert got == {i: naive_generate(fitted, r, 8, SamplingParams(), [])[0] for i, r in enumerate(rows)}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU set of 2 or more cores")
def test_an_engine_that_fails_mid_step_leaves_its_thread_unpinned_and_torch_its_threads(model):
    """A run that ends in an exception while the governor holds one pinned thread gives both back: the next
    engine in the process (the actor's next unit) must not inherit a single pinned core."""
    import threading

    import torch

    from persimmon.engine import GenerationEngine, Request

    before = torch.get_num_threads()
    outcome = {}

    def stepping_thread():
        tid = threading.get_native_id()
        whole = set(os.sched_getaffinity(tid))
        torch.set_num_threads(2)
        engine = GenerationEngine(model, 4, adaptive_threads=True)
        engine.governor.current = 1  # as if the governor had measured one thread best
        engine.add(Request(0, [1, 2, 3]))

        def broken(*args, **kwargs):
            outcome["during"] = (set(os.sched_getaffinity(tid)), torch.get_num_threads())
            raise RuntimeError("the step failed")

        engine._decode = broken
        try:
            engine.step()
        except RuntimeError:
            pass
        outcome["after"] = (set(os.sched_getaffinity(tid)), torch.get_num_threads())
        outcome["whole"] = whole

    t = threading.Thread(target=stepping_thread)
    t.start()
    t.join()
    torch.set_num_threads(before)
    assert len(outcome["during"][0]) == 1 and outcome["during"][1] == 1
    assert outcome["after"] == (outcome["whole"], 2)
