"""SlotScheduler: the generation engine's decisions, as pure code (no torch, no model).

The engine (persimmon.engine) runs a pool of KV-cache slots; this module decides everything about them that
does not touch a tensor, so it is tested with fake tokens in milliseconds (tests/persimmon/test_scheduler.py):
- the pool's layout: `positions` cache positions in all (from the memory the cache may use) shared by
  `slots` rows of `capacity` positions each, capacity a multiple of CAPACITY_STEP that fits the longest row
  (prompt + max_new_tokens); a longer row waits until the rows in the slots fit a grown layout;
- admission: which waiting requests take free slots now (while rows decode, only once 1/ADMIT_FRACTION of
  the slots are free, or every waiting row fits: a prefill of one short row costs nearly one of eight);
- finish rules: EOS, a stop string, a grammar that is complete or refuses the token, max_new_tokens, a
  non-finite row;
- release: a finished row's slot is refilled by the last running row, so running rows always hold the slots
  [0, running) and a decode step works on a prefix of the pool without gathering. The move is returned for
  the engine to apply to the keys and values;
- order: decode attention reads each range of CHUNK_ROWS slots up to its longest row, so rows sorted by
  length read little past their own. Admitted rows take their slots longest first (`placement`, which also
  groups them for prefill); admissions while rows decode disturb the order; every RESORT_EVERY
  steps the scheduler sorts the running rows (longest first) when that cuts the positions read by a tenth,
  and returns the permutation for the engine to apply to the cache.

Request states: WAITING (queued), RUNNING (holds a slot), FINISHED (its completion handed back).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from .lines import one_line
from .params import FinishReason, SamplingParams, StopChecker, TokenLogprob

CAPACITY_STEP = 64  # slot capacity is a multiple of this (fewer regrowths, fewer compiled shapes)
CHUNK_ROWS = 32  # decode attention runs over slot ranges of this many rows, each reading to its own longest
RESORT_EVERY = 16  # decode steps between checks of whether sorting the running rows by length pays
ADMIT_FRACTION = 8  # while decoding, rows are admitted once 1/8 of the slots are free
INCOMPLETE = "incomplete structured output"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    key: Any  # the caller's handle, returned with the completion
    ids: list[int]  # the whole prompt, BOS included, as it tokenizes on its own
    params: SamplingParams | None = None  # None: the engine's defaults; max_new_tokens None: the engine's
    seed_key: bytes | None = None  # what the row's sampling seed hashes (default: its prompt tokens)


@dataclass
class Completion:
    key: Any
    tokens: list[int]  # new tokens, up to and including the EOS / stop-completing token
    finish_reason: FinishReason
    text: str | None  # without EOS, cut before a stop string (needs `decode`)
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token when the request asked for them
    error: str | None = None  # e.g. "incomplete structured output" (the completion is kept)


@dataclass
class Row:
    """A request while it holds a slot: its resolved parameters, what it has produced, how it ended."""

    request: Request
    params: SamplingParams  # resolved: max_new_tokens set
    uniforms: list[float] | None = None  # the row's own draws, one per step (None: greedy)
    stopper: StopChecker | None = None
    matcher: Any = None  # the grammar's state for this row (llguidance's matcher interface)
    logprobs: list[TokenLogprob] | None = None
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    error: str | None = None
    status: RequestStatus = RequestStatus.RUNNING

    @property
    def next_position(self) -> int:
        """Where the last sampled token goes in the cache (the prompt fills [0, len(ids)))."""
        return len(self.request.ids) + len(self.tokens) - 1

    @property
    def next_uniform(self) -> float | None:
        return None if self.uniforms is None else self.uniforms[len(self.tokens)]


@dataclass(frozen=True)
class Layout:
    slots: int
    capacity: int


@dataclass
class Admission:
    """What one scheduling decision asks of the engine: allocate `layout` first when it is not None (copying
    the running rows over), then prefill `requests` into slots [first, first + len(requests))."""

    requests: list[Request]
    first: int
    layout: Layout | None = None


@dataclass(frozen=True)
class Release:
    """A finished row and, when another row must fill its slot, the move (source slot -> target slot) of that
    row's `length` cached positions."""

    row: Row
    slot: int  # the slot it held
    move: tuple[int, int] | None = None
    length: int = 0


def grammar_error(text: str, limit: int = 300) -> str:
    """llguidance's error as one short line: its first line (what follows is parser state and the grammar)."""
    return one_line(text, limit, first=True)


def chunk_reads(lengths: Sequence[int], chunk: int = CHUNK_ROWS) -> list[tuple[int, int, int]]:
    """(first row, end row, positions to read) for each range of `chunk` rows: the range's longest length."""
    return [(a, min(a + chunk, len(lengths)), max(lengths[a:a + chunk])) for a in range(0, len(lengths), chunk)]


def positions_read(lengths: Sequence[int], chunk: int = CHUNK_ROWS) -> int:
    return sum((b - a) * read for a, b, read in chunk_reads(lengths, chunk))


def layout_for(need: int, positions: int, max_slots: int) -> Layout:
    """The layout for rows of up to `need` positions within `positions` cache positions in all."""
    capacity = -(-need // CAPACITY_STEP) * CAPACITY_STEP
    return Layout(max(1, min(max_slots, positions // capacity)), capacity)


class SlotScheduler:
    def __init__(self, defaults: SamplingParams, max_new_tokens: int, eos_ids: set[int], positions: int,
                 max_slots: int = 256) -> None:
        """defaults: the parameters of requests that bring none (their max_new_tokens: max_new_tokens).
        positions: cache positions over all slots. max_slots: rows decoded together at most."""
        self.defaults, self.max_new_tokens, self.eos_ids = defaults.with_defaults(max_new_tokens), max_new_tokens, eos_ids
        self.positions, self.max_slots = positions, max_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Row] = []  # slot i holds running[i]
        self.layout: Layout | None = None

    # -- queue -----------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def reset(self) -> None:
        self.waiting.clear()
        self.running.clear()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def params(self, request: Request) -> SamplingParams:
        return self.defaults if request.params is None else request.params.with_defaults(self.max_new_tokens)

    def need(self, request: Request) -> int:
        return len(request.ids) + self.params(request).max_new_tokens

    # -- admission -------------------------------------------------------------------------------------------
    def schedule(self) -> Admission | None:
        """Which waiting requests to admit now (taken off the queue), and the layout they need; None: none."""
        if self.running and self.layout is not None:
            free = self.layout.slots - len(self.running)
            if free < min(max(1, self.layout.slots // ADMIT_FRACTION), len(self.waiting)):
                return None
        layout, admitted = self.layout, []
        grown = None
        while self.waiting:
            fits, bigger = self._fit(self.waiting[0], layout, len(self.running) + len(admitted))
            if not fits:
                break
            if bigger is not None:
                layout = grown = bigger
            admitted.append(self.waiting.popleft())
        if not admitted:
            return None
        self.layout = layout
        return Admission(admitted, len(self.running), grown)

    def _fit(self, request: Request, layout: Layout | None, occupied: int) -> tuple[bool, Layout | None]:
        """(whether the request gets a slot, the grown layout it needs or None)."""
        need = self.need(request)
        if layout is not None and need <= layout.capacity:
            return occupied < layout.slots, None
        if layout is None:  # size the first pool by what is waiting now
            need = max(self.need(r) for r in list(self.waiting)[: self.max_slots])
        bigger = layout_for(need, self.positions, self.max_slots)
        if occupied >= bigger.slots:
            return False, None  # a longer row waits until enough rows finish for the bigger slots to fit
        return True, bigger

    def sort_order(self, chunk: int = CHUNK_ROWS, gain: float = 0.1) -> list[int] | None:
        """The permutation (new slot i <- old slot order[i]) that sorts the running rows longest first, applied
        to `running`, when it cuts the positions chunked attention reads by `gain`; else None."""
        lengths = [row.next_position + 1 for row in self.running]
        if len(lengths) <= chunk:
            return None
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if positions_read([lengths[i] for i in order], chunk) > (1 - gain) * positions_read(lengths, chunk):
            return None
        self.running = [self.running[i] for i in order]
        return order

    def start(self, rows: Sequence[Row]) -> None:
        """The admitted requests. rows, in the admission's order, take their slots."""
        self.running.extend(rows)

    # -- finish rules ----------------------------------------------------------------------------------------
    def update(self, slots: Sequence[int], tokens: Sequence[int]) -> list[Release]:
        """Each slot's next token (-1: the row's scores were not finite); the rows that ended, released (in
        descending slot order, each move valid when applied in that order)."""
        finished = []
        for slot, token in zip(slots, tokens):
            sequence = self.running[slot]
            self.take(sequence, token)
            if sequence.finish is not None:
                finished.append(slot)
        return [self.release(slot) for slot in sorted(finished, reverse=True)]

    def take(self, row: Row, token: int) -> None:
        """Append a sampled token to its row and decide whether the row ends."""
        if token < 0:
            row.finish = FinishReason.NONFINITE
            return
        row.tokens.append(token)
        matcher = row.matcher
        if matcher is not None and not matcher.consume_token(token):
            row.finish, row.error = FinishReason.STOP, f"structured output: {grammar_error(matcher.get_error())}"
            return
        if token in self.eos_ids:
            row.finish = FinishReason.EOS
        elif matcher is not None and matcher.is_stopped():
            row.finish = FinishReason.STOP  # the grammar is complete: nothing may follow
        elif row.stopper is not None and row.stopper.hit(row.tokens):
            row.finish = FinishReason.STOP
        elif len(row.tokens) == row.params.max_new_tokens:
            row.finish = FinishReason.LENGTH
        if row.finish is not None and matcher is not None and row.error is None and not matcher.is_accepting():
            row.error = INCOMPLETE

    def release(self, slot: int) -> Release:
        """Free a finished row's slot; the last running row moves into it (running rows stay contiguous)."""
        row = self.running[slot]
        row.status = RequestStatus.FINISHED
        last = len(self.running) - 1
        move, length = None, 0
        if slot != last:
            moved = self.running[last]
            move, length = (last, slot), moved.next_position + 1
            self.running[slot] = moved
        self.running.pop()
        return Release(row, slot, move, length)


def length_groups(sizes: Sequence[int], budget: int, max_waste: float = 0.1, min_tokens: int = 0,
                  max_rows: int | None = None, keys: Sequence[Any] | None = None) -> list[tuple[int, int]]:
    """The project's one length grouper: rows of `sizes` (tokens each, already in length order, ascending or
    descending) cut into contiguous groups [a, b) that are padded to their longest row. A row joins the group
    while the padded size (rows x longest) stays within `budget` and within (1 + max_waste) x the real tokens,
    the group has fewer than `max_rows` rows, and its `keys` (a shared prefix's start, say) are equal; the
    waste rule applies only once the group holds `min_tokens` (matmul efficiency depends on the tokens in a
    batch, not its rows, so short rows lose nothing in groups of their own). A row longer than the budget
    gets a group of its own."""
    groups: list[tuple[int, int]] = []
    start = longest = real = 0
    for i, size in enumerate(sizes):
        if i > start:
            rows, top = i - start, max(longest, size)
            padded = (rows + 1) * top
            wasteful = padded > (1 + max_waste) * (real + size) and rows * top >= min_tokens
            if padded <= budget and not wasteful and (max_rows is None or rows < max_rows) and \
                    (keys is None or keys[i] == keys[start]):
                longest, real = top, real + size
                continue
            groups.append((start, i))
        start, longest, real = i, size, size
    if len(sizes):
        groups.append((start, len(sizes)))
    return groups


def placement(lengths: Sequence[int], starts: Sequence[int], max_waste: float = 0.1,
              max_tokens: int = 16384) -> tuple[list[int], list[tuple[int, int]]]:
    """Where admitted rows go and how they are prefilled. lengths: each row's tokens; starts: the tokens of it
    already cached (a shared prefix) or 0. Returns the order the rows take their slots in (longest first, as
    decode attention wants them) and the prefill groups as contiguous ranges [a, b) of that order, so each
    group is prefilled straight into its slots. A group's rows share their start, and its padded size (rows x
    longest suffix) stays within (1 + max_waste) x its real tokens and within max_tokens (a single longer row
    still gets a group)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], starts[i]))
    suffixes = [lengths[i] - starts[i] for i in order]
    return order, length_groups(suffixes, max_tokens, max_waste, keys=[starts[i] for i in order])
