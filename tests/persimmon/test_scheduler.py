"""The slot scheduler's decisions with fake tokens (no torch, no model): layout from a byte budget, admission,
growth for a longer row, finish rules, and the slot moves that keep running rows contiguous; and the thread
governor on a fake clock."""

from __future__ import annotations

import os
import random

import pytest

from persimmon.cpu import ThreadGovernor
from persimmon.params import FinishReason, SamplingParams, StopChecker
from persimmon.scheduler import (CAPACITY_STEP, INCOMPLETE, Request, RequestStatus, Row, SlotScheduler, layout_for,
                                 placement)

EOS = 2


def scheduler(positions: int, max_new: int = 10, max_slots: int = 256) -> SlotScheduler:
    return SlotScheduler(SamplingParams(), max_new, {EOS}, positions, max_slots)


def admit_all(s: SlotScheduler):
    admission = s.schedule()
    if admission is None:
        return None
    s.start([Row(r, s.params(r)) for r in admission.requests])
    return admission


def test_layout_from_the_budget():
    assert layout_for(100, 10_000, 256) == (layout := layout_for(100, 10_000, 256))
    assert layout.capacity == 2 * CAPACITY_STEP and layout.slots == 10_000 // 128
    assert layout_for(100, 10_000_000, 256).slots == 256  # max_slots caps it
    assert layout_for(5000, 100, 256).slots == 1  # one row always fits


def test_first_admission_sizes_the_pool_by_what_waits():
    s = scheduler(positions=64 * 4)
    for i, n in enumerate([5, 30, 50, 7, 9, 11]):
        s.add(Request(i, [1] * n))
    admission = admit_all(s)
    # the longest waiting row needs 50 + 10 positions: 64-position slots, 4 of them
    assert admission.layout.capacity == 64 and admission.layout.slots == 4
    assert [r.key for r in admission.requests] == [0, 1, 2, 3] and admission.first == 0
    assert [r.key for r in s.waiting] == [4, 5]
    assert all(r.status is RequestStatus.RUNNING for r in s.running)


def test_admission_waits_for_an_eighth_of_the_slots_while_rows_decode():
    s = scheduler(positions=16 * 64, max_slots=16)
    for i in range(40):
        s.add(Request(i, [1, 5, 6]))
    assert len(admit_all(s).requests) == 16
    s.update([0], [EOS])  # one slot free: 1 < 16 // 8, and 24 wait
    assert s.schedule() is None
    s.update([0], [EOS])  # two free
    assert len(admit_all(s).requests) == 2


def test_a_longer_row_grows_the_layout_once_the_running_rows_fit():
    s = scheduler(positions=4 * 64, max_new=10)
    for i in range(4):
        s.add(Request(i, [1] * 20))
    assert admit_all(s).layout.slots == 4
    s.add(Request("long", [1] * 100))  # needs 110 positions: 128-position slots, only 2 of them
    assert s.schedule() is None  # four rows running: they would not fit two slots
    for _ in range(3):
        s.update([0], [EOS])
    admission = admit_all(s)
    assert admission.layout.capacity == 128 and admission.layout.slots == 2
    assert [r.key for r in admission.requests] == ["long"] and admission.first == 1


def test_a_row_ends_at_max_new_tokens():
    s = scheduler(positions=1024, max_new=3)
    for i in range(3):
        s.add(Request(i, [1, 9]))
    admit_all(s)
    releases = s.update([0, 1, 2], [7, EOS, 8])
    assert [r.row.request.key for r in releases] == [1]
    assert [row.request.key for row in s.running] == [0, 2]  # the last row moved into the freed slot
    assert s.update([0, 1], [8, 9]) == []
    releases = s.update([0, 1], [9, 10])
    assert {r.row.request.key: r.row.tokens for r in releases} == {0: [7, 8, 9], 2: [8, 9, 10]}
    assert all(r.row.finish == FinishReason.LENGTH and r.row.status is RequestStatus.FINISHED for r in releases)
    assert not s.busy


def test_nonfinite_and_eos_reasons():
    s = scheduler(positions=1024)
    s.add(Request("a", [1]))
    s.add(Request("b", [1]))
    admit_all(s)
    releases = s.update([0, 1], [EOS, -1])
    reasons = {r.row.request.key: r.row.finish for r in releases}
    assert reasons == {"a": FinishReason.EOS, "b": FinishReason.NONFINITE}
    assert [t for r in releases if r.row.request.key == "b" for t in r.row.tokens] == []


def test_stop_strings_end_a_row():
    vocab = {5: "he", 6: "llo", 7: " END", 8: "x"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    s = scheduler(positions=1024, max_new=10)
    s.add(Request(0, [1], SamplingParams(stop=("END",))))
    admission = s.schedule()
    row = Row(admission.requests[0], s.params(admission.requests[0]))
    row.stopper = StopChecker(row.params.stop, decode)
    s.start([row])
    assert s.update([0], [5]) == [] and s.update([0], [6]) == []
    [release] = s.update([0], [7])
    assert release.row.finish == FinishReason.STOP and row.stopper.cut(decode(row.tokens)) == "hello "


class FakeMatcher:
    """llguidance's matcher interface: accepts tokens from `allowed`, complete after `complete_after`."""

    def __init__(self, allowed, complete_after, accepting=True):
        self.allowed, self.left, self.accepting = set(allowed), complete_after, accepting

    def consume_token(self, token):
        if token not in self.allowed:
            return False
        self.left -= 1
        return True

    def get_error(self):
        return "token not allowed"

    def is_stopped(self):
        return self.left == 0

    def is_accepting(self):
        return self.accepting and self.left == 0


def test_grammar_rows_end_when_complete_refused_or_cut():
    s = scheduler(positions=1024, max_new=2)
    for key in ("complete", "refused", "cut"):
        s.add(Request(key, [1]))
    admission = s.schedule()
    rows = [Row(r, s.params(r)) for r in admission.requests]
    rows[0].matcher = FakeMatcher({4}, complete_after=1)
    rows[1].matcher = FakeMatcher({4}, complete_after=1)
    rows[2].matcher = FakeMatcher({4}, complete_after=5)
    s.start(rows)
    first = {r.row.request.key: r.row for r in s.update([0, 1, 2], [4, 9, 4])}
    assert first["complete"].finish == FinishReason.STOP and first["complete"].error is None
    assert first["refused"].finish == FinishReason.STOP and "not allowed" in first["refused"].error
    [cut] = s.update([0], [4])
    assert cut.row.finish == FinishReason.LENGTH and cut.row.error == INCOMPLETE


def test_releases_keep_running_rows_contiguous_and_their_moves_are_right():
    """Random finishes over many steps: after each step's releases, applied in order to a model of the cache
    (slot -> the key whose positions it holds), every running row's slot holds its own positions."""
    rng = random.Random(3)
    s = scheduler(positions=8 * 64, max_new=12, max_slots=8)
    for i in range(60):
        s.add(Request(i, [1] * rng.randint(1, 40)))
    cache: dict[int, object] = {}
    done = []
    while s.busy:
        admission = admit_all(s)
        if admission is not None:
            if admission.layout is not None:
                cache = {slot: key for slot, key in cache.items() if slot < len(s.running) - len(admission.requests)}
            for j, request in enumerate(admission.requests):
                cache[admission.first + j] = request.key
        slots = list(range(len(s.running)))
        tokens = [EOS if rng.random() < 0.15 else 5 for _ in slots]
        by_key = {row.request.key: row for row in s.running}
        for release in s.update(slots, tokens):
            done.append(release.row.request.key)
            if release.move is not None:
                source, target = release.move
                cache[target] = cache.pop(source)
                assert release.length == by_key[cache[target]].next_position + 1  # its positions, this token's too
            else:
                cache.pop(release.slot)
        assert {slot: row.request.key for slot, row in enumerate(s.running)} == cache
    assert sorted(done) == list(range(60))


def test_placement_orders_rows_longest_first_in_contiguous_groups_that_bound_padding():
    lengths = [5, 100, 6, 7, 98, 50, 52, 40, 41, 90]
    starts = [0, 0, 0, 0, 0, 4, 4, 4, 0, 4]  # some rows share a 4-token prefix
    order, groups = placement(lengths, starts, max_tokens=150)
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert groups[0][0] == 0 and groups[-1][1] == len(order)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(groups, groups[1:]))  # contiguous, covering every row
    for a, b in groups:
        members = order[a:b]
        assert len({starts[i] for i in members}) == 1  # one pass: one shared start
        suffixes = [lengths[i] - starts[i] for i in members]
        padded = len(members) * max(suffixes)
        assert len(members) == 1 or (padded <= 1.25 * sum(suffixes) and padded <= 150)
    assert len(groups) < len(lengths)  # similar lengths do share passes


def test_the_scheduler_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "class Missing:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('torch is not available here')\n"
            "sys.meta_path.insert(0, Missing())\n"
            "import persimmon.scheduler, persimmon.cpu, persimmon.params\n"
            "print('imported')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


# -- the thread governor, on a fake clock ----------------------------------------------------------------------
class FakeMachine:
    """A step's seconds per row as a function of the thread count; the governor's clock advances by it."""

    def __init__(self, cost):
        self.cost, self.now, self.threads, self.sets = cost, 0.0, None, 0

    def clock(self):
        return self.now

    def set_threads(self, n):
        self.threads, self.sets = n, self.sets + 1

    def run(self, governor, steps, rows=32):
        used = []
        for _ in range(steps):
            governor.before()
            n = self.threads or governor.most
            used.append(n)
            self.now += self.cost(n) * rows
            governor.after(rows)
        return used


def test_the_governor_keeps_all_threads_on_a_quiet_machine():
    machine = FakeMachine(lambda n: 1.0 / n)
    governor = ThreadGovernor(4, machine.set_threads, machine.clock, period=10)
    used = machine.run(governor, 2000)
    assert governor.current == 4 and governor.moves == 0
    assert used.count(4) > 0.97 * len(used)  # probes are rare once confirmed (the period doubles)


def test_the_governor_drops_threads_when_other_work_holds_cores():
    # two of four cores busy elsewhere: more than 2 threads wait on busy cores
    machine = FakeMachine(lambda n: 1.0 / n if n <= 2 else 3.0)
    governor = ThreadGovernor(4, machine.set_threads, machine.clock, period=10)
    used = machine.run(governor, 600)
    assert governor.current == 2
    assert used[-100:].count(2) > 90
    # the load goes away: the governor climbs back
    machine.cost = lambda n: 1.0 / n
    machine.run(governor, 3000)
    assert governor.current == 4


def test_an_idle_governor_gives_torch_all_threads_and_keeps_its_choice_for_the_next_run():
    machine = FakeMachine(lambda n: 1.0 if n == 1 else 5.0)
    governor = ThreadGovernor(2, machine.set_threads, machine.clock, period=5)
    machine.run(governor, 200)
    assert governor.current == 1
    governor.rest()  # idle: other work in the process gets every thread
    assert machine.threads == 2 and governor.current == 1
    governor.apply()  # the next run's prefill, before any timed step
    assert machine.threads == 1
    used = machine.run(governor, 5)
    assert used == [1] * 5  # no probe before the first period has passed again


@pytest.mark.parametrize("most", [1])
def test_one_thread_is_never_probed(most):
    machine = FakeMachine(lambda n: 1.0)
    governor = ThreadGovernor(most, machine.set_threads, machine.clock, period=2)
    machine.run(governor, 50)
    assert machine.sets == 0


def test_rows_are_sorted_longest_first_when_that_cuts_what_attention_reads():
    from persimmon.scheduler import positions_read

    s = scheduler(positions=100_000, max_new=50, max_slots=128)
    rng = random.Random(1)
    lengths = [rng.randint(2, 300) for _ in range(96)]
    for i, n in enumerate(lengths):
        s.add(Request(i, [1] * n))
    admit_all(s)
    before = [row.next_position + 1 for row in s.running]
    keys = [row.request.key for row in s.running]
    order = s.sort_order(chunk=32)
    assert order is not None and sorted(order) == list(range(96))
    after = [row.next_position + 1 for row in s.running]
    assert after == sorted(before, reverse=True) and [row.request.key for row in s.running] == [keys[i] for i in order]
    assert positions_read(after, 32) < 0.9 * positions_read(before, 32)
    assert s.sort_order(chunk=32) is None  # already sorted: nothing to gain
    few = scheduler(positions=100_000)
    for i in range(10):
        few.add(Request(i, [1] * (10 * i + 1)))
    admit_all(few)
    assert few.sort_order(chunk=32) is None  # one range: the order cannot change what is read


def test_bf16_units_are_read_from_the_cpu_flags_not_timed(monkeypatch):
    """Nodes of one kind must decide alike however busy they are: the flags decide, the clock never does."""
    import torch

    import persimmon.cpu as cpu

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the flags were readable")

    for flags, native in (({"avx2", "fma"}, False), ({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                          ({"asimd", "bf16"}, True)):
        monkeypatch.setattr(cpu, "cpu_features", lambda flags=flags: flags)
        monkeypatch.setattr(torch, "randn", no_timing)  # the timing fallback's matmul inputs
        cpu.bf16_matmul_is_native.cache_clear()
        assert cpu.bf16_matmul_is_native() is native
    cpu.bf16_matmul_is_native.cache_clear()


def _old_batches(sizes, budget, max_waste, min_tokens, max_rows):
    """How the pipelines cut ascending lengths into batches before the one grouper (0.10.0's plan_batches)."""
    batches, real = [], 0
    for i, size in enumerate(sizes):
        if batches:
            current = batches[-1]
            padded = (len(current) + 1) * size
            wasteful = padded > (1 + max_waste) * (real + size) and len(current) * size >= min_tokens
            if padded <= budget and not wasteful and (max_rows is None or len(current) < max_rows):
                current.append(i)
                real += size
                continue
        batches.append([i])
        real = size
    return [(b[0], b[-1] + 1) for b in batches]


def _old_prefill_groups(suffixes, keys, max_waste, max_tokens):
    """How the engine cut descending lengths into prefill groups before the one grouper (0.10.0's placement)."""
    groups, a = [], 0
    while a < len(suffixes):
        longest = suffixes[a]
        real, b = longest, a + 1
        while b < len(suffixes) and keys[b] == keys[a]:
            padded = (b - a + 1) * longest
            if padded > (1 + max_waste) * (real + suffixes[b]) or padded > max_tokens:
                break
            real += suffixes[b]
            b += 1
        groups.append((a, b))
        a = b
    return groups


def test_one_length_grouper_cuts_as_both_former_groupers_did():
    """The pipelines' batches (ascending, a row budget, a token floor for the waste rule) and the engine's
    prefill groups (descending, a shared prefix's start as the key) come from length_groups, cut as before."""
    from persimmon.scheduler import length_groups

    rng = random.Random(7)
    for _ in range(400):
        n = rng.randint(0, 60)
        lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(n)]
        budget, waste = rng.choice([64, 512, 2048, 16384]), rng.choice([0.0, 0.1, 0.5])
        ascending = sorted(lengths)
        min_tokens, max_rows = rng.choice([0, 512]), rng.choice([None, 1, 4, 32])
        assert length_groups(ascending, budget, waste, min_tokens, max_rows) == \
            _old_batches(ascending, budget, waste, min_tokens, max_rows)
        keys = sorted((rng.choice([0, 0, 0, 8]) for _ in range(n)))
        descending = sorted(lengths, reverse=True)
        assert length_groups(descending, budget, waste, keys=keys) == _old_prefill_groups(descending, keys, waste, budget)
    assert length_groups([], 100) == []


# -- pinning the stepping thread at one thread ------------------------------------------------------------------
needs_two_cpus = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                    reason="needs a CPU set of 2 or more cores")


def _cpus_of(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


@needs_two_cpus
def test_one_thread_is_pinned_to_its_core_and_any_other_count_unpins_it_first():
    import threading

    from persimmon.cpu import CorePinning, current_core

    counts = []
    results = {}

    def stepping_thread():  # the engine's thread; the test's own thread is left as it was
        tid = threading.get_native_id()
        whole = _cpus_of(tid)
        pinning = CorePinning(counts.append)
        pinning(1)
        results["pinned"] = _cpus_of(tid)
        results["core"] = current_core()
        child = {}
        # a thread started while pinned inherits the pin; after a count above one, threads start on every core
        pinning(2)
        t = threading.Thread(target=lambda: child.update(cpus=_cpus_of(threading.get_native_id())))
        t.start()
        t.join()
        results["after"] = _cpus_of(tid)
        results["child"] = child["cpus"]
        results["whole"] = whole
        pinning(1)
        pinning.release()  # the engine at rest
        results["released"] = _cpus_of(tid)

    t = threading.Thread(target=stepping_thread)
    t.start()
    t.join()
    assert counts == [1, 2, 1]
    assert len(results["pinned"]) == 1 and results["pinned"] <= results["whole"]
    assert results["core"] in results["pinned"]  # it stayed on the core it was pinned to
    assert results["after"] == results["whole"] and results["child"] == results["whole"]
    assert results["released"] == results["whole"]
