"""GenerationEngine: continuous batching over a pool of KV-cache slots.

Rows wait in a queue; whenever slots are free the engine admits waiting rows, longest first, and prefills
them in groups of similar length straight into their slots (a group is a contiguous range of the pool);
every decode step advances all active slots by one token, each at its own position under its own mask. A row
that ends (EOS, stop string, length) frees its slot at once: its result is handed back and a waiting row takes
the slot at the next step, so decode steps stay full instead of shrinking to each batch's stragglers.

Two parts: the decisions (admission, the pool's layout, finish rules, which row moves into a freed slot) are
persimmon.scheduler's SlotScheduler, pure code; this module is the model runner that carries them out on
tensors: the pool, prefill, the decode step, sampling, grammar masks.

The pool holds `slots` rows of `capacity` positions per layer, (slots, H, capacity, D); slot s holds one row's
tokens at [0, length). Running rows always occupy slots [0, running): a decode step runs on a prefix of the
pool without gathering. The pool is sized by bytes, like vLLM's KV cache: `kv_cache_bytes` (default: a
quarter of the memory available on the device, at most 4 GiB on a CPU) buys that many positions, shared by
up to `max_slots` rows of the longest row's length.

Shared prefix: the prompt template's text before a row's own text is prefilled once; each row whose tokens
start with it copies those keys and values into its slot and prefills only the rest.

A row's tokens do not depend on its batch-mates, slot, arrival order or budget: positions and masks are per
row, and sampling draws from the row's own generator seeded by (seed, prompt tokens), as in generate().
Token ids past `vocab_limit` (a vocabulary padded beyond the tokenizer) are never produced.

Every request carries its own SamplingParams (temperature, top-k/p, seed, max_new_tokens, stop strings,
logprobs, grammar); rows with different parameters share decode steps. A grammar's masks for the next step
are computed on a second thread while the model runs the step (llguidance releases the GIL), then applied to
the step's logits before sampling.

On a CPU the decode step's thread count is chosen by measurement (persimmon.cpu.ThreadGovernor): fewer
threads when other work holds cores, all of them when the machine is quiet; at one thread, that thread is
pinned to its core.
"""

from __future__ import annotations

import collections
import dataclasses
import concurrent.futures
import functools
import secrets
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .cache import KVCache, copy_positions
from .cpu import CorePinning, ThreadGovernor
from .sampling import FinishReason, SamplingParams, StopChecker, TokenLogprob, row_seed, row_uniforms, sample
from .scheduler import (ADMIT_FRACTION, CAPACITY_STEP, INCOMPLETE, RESORT_EVERY, Completion, Layout,  # noqa: F401
                        Release, Request, Row, SlotScheduler, chunk_reads, placement)

CPU_KV_CACHE_CAP = 4 << 30  # a CPU's default cache: at most this, or a quarter of the available memory


def default_kv_cache_bytes(device: torch.device) -> int:
    """A quarter of what the device has free (CUDA: free device memory after the weights; CPU: available
    memory, capped at CPU_KV_CACHE_CAP)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    from .cpu import available_memory_bytes

    available = available_memory_bytes()
    return CPU_KV_CACHE_CAP if available is None else min(CPU_KV_CACHE_CAP, available // 4)


class SlotPool:
    """Keys and values for `slots` rows of `capacity` positions, per layer (slots, H, capacity, D)."""

    @staticmethod
    def bytes_per_position(config, dtype: torch.dtype) -> int:
        """What one cached position costs over every layer's keys and values."""
        return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * dtype.itemsize

    def __init__(self, config, slots: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, config.num_attention_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.capacity = slots, capacity

    def rows(self, first: int, end: int) -> KVCache:
        """Slots [first, end) as a KVCache (views: a prefill through it writes straight into the pool)."""
        return KVCache.over([k[first:end] for k in self.keys], [v[first:end] for v in self.values])

    def move(self, source: int, target: int, length: int) -> None:
        copy_positions(self, target, self, source, length)

    def copy_from(self, other: "SlotPool", rows: int, length: int) -> None:
        copy_positions(self, slice(0, rows), other, slice(0, rows), length)

    def permute(self, order: Sequence[int], lengths: Sequence[int]) -> None:
        """Slot i takes what slot order[i] held, positions [0, lengths[i]) (lengths in the new order, longest
        first). Only the rows that move are copied, each range of CHUNK_ROWS rows up to its longest."""
        device = self.keys[0].device
        moves = []
        for a, b, read in chunk_reads(lengths):
            targets = [i for i in range(a, b) if order[i] != i]
            if targets:
                moves.append((torch.tensor(targets, device=device),
                              torch.tensor([order[i] for i in targets], device=device), read))
        for buffers in (self.keys, self.values):
            for buf in buffers:
                gathered = [buf[source, :, :read] for _, source, read in moves]  # every read before any write
                for (target, _, read), part in zip(moves, gathered):
                    buf[target, :, :read] = part


class SlotBatch:
    """The LayerCache a decode step sees: the first `rows` slots of a pool, each row writing its one new key
    and value at its own position and reading positions [0, read). The engine owns the positions, so
    `advance` has nothing to count. `chunks`, when
    given, are (first row, end row, positions to read) ranges: the attention reads each range only up to its
    own longest row (KVCache's is None: one read for all)."""

    def __init__(self, pool: SlotPool, rows: int, positions: torch.Tensor, read: int,
                 chunks: list[tuple[int, int, int]] | None = None) -> None:
        self.pool, self.rows, self.positions, self.read, self.chunks = pool, rows, positions, read, chunks
        self.index = torch.arange(rows, device=positions.device)

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def length(self) -> int:
        return self.read - 1

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys[self.index, :, self.positions] = key[:, :, 0]  # (rows, H, D) at (row, :, its position)
        values[self.index, :, self.positions] = value[:, :, 0]
        return keys[: self.rows, :, : self.read], values[: self.rows, :, : self.read]

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: each row's position is the engine's, set before the next step."""


def prefill_rows(model, rows: Sequence[Sequence[int]], start: int = 0, prefix: KVCache | None = None,
                 pad: int = 0, room: int = 0, cache: KVCache | None = None) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Prefill rows whose first `start` tokens are a shared prefix already in `prefix` (its keys and values
    are copied, not recomputed): the rest of each row goes through the model right-padded. Returns the
    cache (start + width positions filled, `room` more free; `cache` when given, e.g. a pool's rows), the
    attention mask over those positions (B, start + width) and each row's last-token logits (B, V) in
    float32.

    The pass itself runs plainly causal: with right padding a real token's causal window holds only real
    tokens, so the mask would change nothing it computes (pads compute garbage that is never read: later
    passes mask those positions or overwrite them)."""
    device = model.device
    suffixes = [list(r[start:]) for r in rows]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), start + width, dtype=torch.long)
    mask[:, :start] = 1
    for i, s in enumerate(suffixes):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, start : start + len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    if cache is None:
        cache = KVCache.for_model(model.config, len(rows), start + width + room, model.kv_dtype, device)
    if start:
        copy_positions(cache, slice(None), prefix, slice(None), start)
    cache.length = start
    hidden = model.model(ids, past_key_values=cache).last_hidden_state
    last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
    logits = model.lm_head(hidden[torch.arange(len(rows), device=device), last]).float()
    return cache, mask, logits


def prefill_prefix(model, ids: Sequence[int]) -> KVCache:
    """The keys and values of a prefix that many rows share, computed once (one row)."""
    cache = KVCache.for_model(model.config, 1, len(ids), model.kv_dtype, model.device)
    model(torch.tensor([list(ids)], device=model.device), past_key_values=cache, logits_to_keep=1)
    return cache


def shares_prefix(ids: Sequence[int], prefix: Sequence[int] | None) -> bool:
    """Whether a row's tokens start with the prefix's (and go on past it): a template's text can tokenize
    differently where the row's own text begins, and such a row is prefilled whole."""
    return bool(prefix) and len(ids) > len(prefix) and list(ids[: len(prefix)]) == list(prefix)


def _slot_decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotBatch):
    return model(tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 logits_to_keep=1).logits[:, -1]


@functools.cache
def _compiled_slot_step():
    """The decode step under torch.compile; on CUDA "reduce-overhead" replays it as a CUDA graph. Its shapes
    are the pool's, so it is captured once per pool and reused by every later step and call."""
    return torch.compile(_slot_decode_step, mode="reduce-overhead", fullgraph=True)


class GenerationEngine:
    def __init__(
        self,
        model,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        token_budget: int | None = None,
        max_slots: int = 256,
        prefix_ids: Sequence[int] | None = None,
        vocab_limit: int | None = None,
        pad_token_id: int = 0,
        compile: bool | None = None,
        vocabulary=None,
        kv_cache_bytes: int | None = None,
        adaptive_threads: bool | None = None,
        prefill_tokens: int = 16384,
    ) -> None:
        """max_new_tokens, sampling, stop: the defaults of requests that bring no parameters of their own (and
        the max_new_tokens of those whose parameters leave it None). kv_cache_bytes: memory for the slots'
        keys and values (default: default_kv_cache_bytes); token_budget: cache positions over all slots
        instead (slots x capacity). prefix_ids: tokens most prompts start with (BOS included), prefilled
        once. vocab_limit: ids at or past it are never produced. compile: decode with a compiled
        fixed-shape step over the whole pool (CUDA graphs on GPU); None = on for CUDA. vocabulary: a
        persimmon.grammar.Vocabulary, needed by requests with a grammar or logprobs. adaptive_threads: let
        a ThreadGovernor pick the decode step's CPU threads (None: on for CPU when torch has several).
        prefill_tokens: padded tokens per prefill forward pass (a longer row still gets one of its own)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.config = model, model.config
        self.device, self.dtype = model.device, model.kv_dtype  # the cache's and the decode mask's
        self.max_new_tokens = max_new_tokens
        sampling = sampling or SamplingParams()
        if stop:
            sampling = dataclasses.replace(sampling, stop=tuple(stop))
        self.sampling = sampling.with_defaults(max_new_tokens)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.decode = decode
        self.vocabulary = vocabulary
        self._check(self.sampling)
        if token_budget is None:
            budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(self.device)
            token_budget = budget // SlotPool.bytes_per_position(self.config, self.dtype)
        if token_budget < 1:
            raise ValueError(f"the KV cache budget holds no position (token_budget {token_budget})")
        self.token_budget, self.max_slots, self.prefill_tokens = token_budget, max_slots, prefill_tokens
        self.scheduler = SlotScheduler(self.sampling, max_new_tokens, self.eos_ids, token_budget, max_slots)
        self.prefix_ids = list(prefix_ids) if prefix_ids and len(prefix_ids) > 1 else None
        self.prefix_cache: KVCache | None = None
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < self.config.vocab_size else None
        self.pad = pad_token_id
        self.static = compile if compile is not None else self.device.type == "cuda"
        self.fallback_seed = secrets.randbits(63)  # for sampled requests whose seed is None
        self.pool: SlotPool | None = None
        self._masker: concurrent.futures.ThreadPoolExecutor | None = None
        self.counters = collections.Counter()  # prefill_tokens, prefix_tokens_shared, decode_steps, ...
        self.seconds = collections.Counter()  # wall time in admission + prefill, decode steps, mask work
        threads = torch.get_num_threads()
        if adaptive_threads is None:
            adaptive_threads = self.device.type == "cpu" and threads > 1
        # at one thread the stepping thread is pinned to its core (persimmon.cpu.CorePinning)
        self.governor = ThreadGovernor(threads, CorePinning(torch.set_num_threads)) if adaptive_threads else None

    def _check(self, params: SamplingParams) -> None:
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a decode function (token ids -> text)")
        if (params.grammar is not None or params.logprobs is not None) and self.vocabulary is None:
            raise ValueError("a grammar or logprobs need the engine's vocabulary (persimmon.grammar.Vocabulary)")

    # -- queue -----------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if not request.ids:
            raise ValueError(f"request {request.key!r} has no tokens")
        if request.params is not None:
            self._check(request.params)
        self.scheduler.add(request)

    def reset(self) -> None:
        """Drop every waiting and running row (the pool, the compiled step and the shared prefix stay)."""
        self.scheduler.reset()

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def active(self) -> list[Row]:
        return self.scheduler.running

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def slots(self) -> int:
        """Rows decoded together (known once the pool exists; before, the budget's guess)."""
        return self.pool.slots if self.pool is not None else self.max_slots

    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Every request's completion, as they finish (not in request order)."""
        for request in requests:
            self.add(request)
        while self.busy:
            yield from self.step()

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit and prefill waiting rows into free slots, then advance every running row by one token.
        Returns the rows that finished."""
        if self.governor is not None:
            self.governor.apply()  # the prefill too runs at the count the decode steps measured best
        start = time.perf_counter()
        try:
            done = self._admit()
            middle = time.perf_counter()
            if self.active:
                done += self._decode()
        except BaseException:
            if self.governor is not None:  # torch's threads (and the thread's cores) back for whatever runs next
                self.governor.rest()
            raise
        self.seconds["prefill"] += middle - start  # on CUDA, kernels still queued count towards the next
        self.seconds["decode"] += time.perf_counter() - middle
        if self.governor is not None and not self.busy:
            self.governor.rest()
        return done

    # -- pool ------------------------------------------------------------------------------------------------
    def _allocate(self, layout: Layout) -> None:
        """A pool of this layout, the running rows' keys and values copied over."""
        pool = SlotPool(self.config, layout.slots, layout.capacity, self.dtype, self.device)
        if self.pool is not None and self.active:
            pool.copy_from(self.pool, len(self.active), self.pool.capacity)
        self.pool = pool
        if self.static:
            for buf in (*pool.keys, *pool.values):
                torch._dynamo.mark_static_address(buf)
        self.counters["pools"] += 1

    # -- prefill ---------------------------------------------------------------------------------------------
    def _prefix(self) -> KVCache:
        if self.prefix_cache is None:
            self.prefix_cache = prefill_prefix(self.model, self.prefix_ids)
            self.counters["prefix_prefills"] += 1
        return self.prefix_cache

    def _row(self, request: Request) -> Row:
        params = self.scheduler.params(request)
        row = Row(request, params)
        if not params.greedy:
            seed = params.seed if params.seed is not None else self.fallback_seed
            row.uniforms = row_uniforms(row_seed(seed, request.seed_key or request.ids), params.max_new_tokens)
        if params.stop:
            row.stopper = StopChecker(params.stop, self.decode)
        if params.grammar is not None:
            row.matcher = self.vocabulary.matcher(params.grammar)
        if params.logprobs is not None:
            row.logprobs = []
        return row

    def _admit(self) -> list[Completion]:
        admission = self.scheduler.schedule()
        if admission is None:
            return []
        if admission.layout is not None:
            self._allocate(admission.layout)
        requests = admission.requests
        starts = [len(self.prefix_ids) if shares_prefix(r.ids, self.prefix_ids) else 0 for r in requests]
        order, groups = placement([len(r.ids) for r in requests], starts, max_tokens=self.prefill_tokens)
        admitted = [self._row(requests[i]) for i in order]  # longest first: slot order is decode's read order
        first = admission.first
        self.scheduler.start(admitted)
        masks = self._start_masks(admitted)  # computed while the rows prefill
        logits = torch.empty(len(admitted), self.config.vocab_size, device=self.device)
        for a, b in groups:
            logits[a:b] = self._prefill(admitted[a:b], first + a, starts[order[a]])
        return self._advance(logits, list(range(first, first + len(admitted))), masks)

    def _prefill(self, rows: list[Row], slot: int, start: int) -> torch.Tensor:
        """Prefill rows into slots [slot, slot + len(rows)) (from `start`, after the shared prefix), writing
        their keys and values straight into the pool; their last logits (rows, V)."""
        ids = [r.request.ids for r in rows]
        part, _, logits = prefill_rows(self.model, ids, start, self._prefix() if start else None, self.pad,
                                       cache=self.pool.rows(slot, slot + len(rows)))
        width = max(map(len, ids)) - start
        self.counters["prefill_tokens"] += sum(len(i) - start for i in ids)
        self.counters["prefill_padded_tokens"] += len(rows) * width
        self.counters["prefill_batches"] += 1
        self.counters["prefix_tokens_shared"] += start * len(rows)
        return logits

    # -- grammar masks ---------------------------------------------------------------------------------------
    def _start_masks(self, rows: list[Row]):
        """Begin computing the next-token masks of these rows' grammars on the mask thread; None if none."""
        matchers = [r.matcher for r in rows if r.matcher is not None]
        if not matchers:
            return None
        if self._masker is None:
            self._masker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

        def work():
            began = time.perf_counter()
            masks = self.vocabulary.masks(matchers)
            return masks, time.perf_counter() - began

        return self._masker.submit(work)

    def _apply_masks(self, logits: torch.Tensor, rows: list[Row], pending) -> None:
        """Forbid, in place, every token a constrained row's grammar does not allow next."""
        if pending is None:
            return
        waited = time.perf_counter()
        bitmask, spent = pending.result()
        self.seconds["mask_wait"] += time.perf_counter() - waited  # what the forward pass did not hide
        self.seconds["mask"] += spent
        self.counters["mask_rows"] += bitmask.shape[0]
        self.counters["mask_steps"] += 1
        index = [i for i, r in enumerate(rows) if r.matcher is not None]
        width = min(logits.shape[-1], self.vocabulary.size)
        allowed = self.vocabulary.allowed(bitmask, width).to(logits.device)
        part = logits[index]
        part[:, :width] = part[:, :width].masked_fill(~allowed, float("-inf"))
        part[:, width:] = float("-inf")
        logits[index] = part

    # -- decode ----------------------------------------------------------------------------------------------
    def _decode(self) -> list[Completion]:
        if not self.static and self.counters["decode_steps"] % RESORT_EVERY == 0:
            self._sort_rows()
        n = len(self.active)
        masks = self._start_masks(self.active)  # computed while the step runs
        rows = self.pool.slots if self.static else n
        positions = [r.next_position for r in self.active] + [0] * (rows - n)
        tokens = [r.tokens[-1] for r in self.active] + [self.pad] * (rows - n)
        pos = torch.tensor(positions, device=self.device)
        # keys up to the longest row's position (a strided slice of the slots, read in place by the fused
        # attention kernel); the compiled step reads whole slots, its shapes fixed. The mask is additive
        # (0 where a row may attend, -inf past its position), what the kernel takes without converting.
        read = self.pool.capacity if self.static else max(positions) + 1
        mask = torch.zeros(rows, 1, 1, read, dtype=self.dtype, device=self.device)
        mask.masked_fill_(torch.arange(read, device=self.device)[None, None, None] > pos[:, None, None, None],
                          float("-inf"))
        # eager: attention over ranges of rows, each reading to its longest row (rows kept sorted by length)
        chunks = None if self.static else chunk_reads([p + 1 for p in positions])
        batch = SlotBatch(self.pool, rows, pos, read, chunks if chunks and len(chunks) > 1 else None)
        tokens = torch.tensor(tokens, device=self.device)[:, None]
        step = _compiled_slot_step() if self.static else _slot_decode_step
        if self.governor is not None:
            self.governor.before()
        logits = step(self.model, tokens, pos[:, None], mask, batch)[:n].float()
        if self.governor is not None:
            self.governor.after(n)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += n
        return self._advance(logits, list(range(n)), masks)

    def _sort_rows(self) -> None:
        """Carry out the scheduler's reordering of the running rows (longest first) on the cache."""
        order = self.scheduler.sort_order()
        if order is not None:
            self.pool.permute(order, [r.next_position + 1 for r in self.active])
            self.counters["sorts"] += 1

    def _advance(self, logits: torch.Tensor, slots: list[int], masks=None) -> list[Completion]:
        """Sample the next token of the rows in these slots (logits row i for slots[i]) under each row's own
        parameters and grammar; finish and free the rows that end."""
        rows = [self.active[s] for s in slots]
        finite = finite_rows(logits)
        # logprobs are the model's own distribution: before the vocabulary limit, grammar, temperature, top-k/p
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
        raw = torch.log_softmax(logits[wanted].float(), dim=-1) if wanted else None
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        self._apply_masks(logits, rows, masks)
        chosen = sample(logits, [r.params for r in rows], [r.next_uniform for r in rows])
        if finite is not None:
            chosen = torch.where(finite, chosen, -1)
        if raw is not None:
            self._record_logprobs(raw, [rows[i] for i in wanted], chosen[wanted].clamp(min=0))
        return [self._complete(release) for release in self.scheduler.update(slots, chosen.tolist())]

    def _record_logprobs(self, raw: torch.Tensor, rows: list[Row], chosen: torch.Tensor) -> None:
        own = raw.gather(1, chosen[:, None])[:, 0].tolist()
        k = max(r.params.logprobs for r in rows)
        top = torch.topk(raw, k, dim=-1) if k else None
        values = top.values.tolist() if k else [[]] * len(rows)
        ids = top.indices.tolist() if k else [[]] * len(rows)
        for i, (row, token) in enumerate(zip(rows, chosen.tolist())):
            n = row.params.logprobs
            row.logprobs.append(TokenLogprob(token, own[i], list(zip(ids[i][:n], values[i][:n]))))

    def _complete(self, release: Release) -> Completion:
        """Carry out a release on the cache (the row that fills the freed slot) and render the completion."""
        if release.move is not None:
            self.pool.move(*release.move, release.length)
        row = release.row
        text = None
        if row.matcher is not None:  # the bytes the grammar matched (decode would drop a leading space)
            text = self.vocabulary.decode([t for t in row.tokens if t not in self.eos_ids])
        elif self.decode is not None:
            text = self.decode([t for t in row.tokens if t not in self.eos_ids])
            if row.finish == FinishReason.STOP and row.stopper is not None:
                text = row.stopper.cut(text)
        return Completion(row.request.key, row.tokens, row.finish, text, len(row.request.ids), row.logprobs,
                          row.error)


def finite_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """None when every row's logits are finite (one reduction decides it: a sum of finite logits is finite
    short of overflow, and an overflow only sends it to the exact per-element check); else a bool per row."""
    if bool(torch.isfinite(logits.sum()).item()):
        return None
    return torch.isfinite(logits).all(dim=-1)
