"""Running well on a CPU that is not ours alone, and on one without bf16 matrix units.

- ThreadGovernor: picks the intra-op thread count from measured decode steps. On a machine where other work
  holds cores, threads that wait for a busy core stall every parallel region (a 42x512x2048 linear: 1 ms on
  one thread, 9-11 ms on two under contention), so fewer threads beat all of them; on a quiet machine all of
  them win. The governor keeps the faster, re-checking now and then, so a loaded node slows a job in
  proportion to the cores it lost instead of tenfold. Pure code on an injected clock and thread setter.
- CorePinning: the thread setter the engine gives the governor. At one thread it pins the thread that runs the
  steps to the core it is on (as vLLM pins its compute threads): the kernel then moves other work off that core
  rather than time-slicing the three of them over two cores (one thread beside two busy processes on 2 cores:
  270-280 tok/s pinned, 211-227 not). Any other count first gives the thread back its whole CPU set, so the
  threads torch starts for it are not born pinned.
- PASSIVE_WAIT: OpenMP threads that sleep rather than spin between parallel regions (OMP_WAIT_POLICY), set in
  the environment of processes we start before they load torch. It costs nothing on a quiet machine here and
  gives the cores back to other work between steps.
- compute_bf16_linears_in_fp32: where bf16 matmuls have no hardware behind them (AVX2-only CPUs run them at a
  seventh of fp32's speed), a bf16 model's linear layers keep fp32 copies of their (bf16-valued) weights and
  round their outputs to bf16, and attention runs in fp32 over an fp32 cache of those bf16 values; the rest
  (embeddings, LayerNorms, the residual stream) stays bf16. bf16 GEMM and attention kernels accumulate in
  fp32 anyway, so the outputs agree to bf16 rounding. Whether the CPU has bf16 units is read from its feature
  flags (not timed), so nodes of one kind decide alike however busy they are.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from typing import Callable

PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def passive_wait_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to add to a child process's environment (the user's own setting wins)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in PASSIVE_WAIT.items() if k not in environ}


class ThreadGovernor:
    """Chooses how many threads the next decode step gets. Call `before()` before a step and `after(rows)`
    after it. Every `period` steps it tries another count on alternate steps (`trials` of each) and moves
    there when its seconds per row are lower by `margin`; a check that confirms the current count doubles
    the period (up to `longest`), a move resets it. The counts tried rotate over one fewer, one more and
    half the current (a plateau between neighbours does not hide a better count further away)."""

    def __init__(self, most: int, set_threads: Callable[[int], None], clock: Callable[[], float] = time.perf_counter,
                 period: int = 8, longest: int = 768, trials: int = 3, margin: float = 0.1) -> None:
        self.most, self.set_threads, self.clock = most, set_threads, clock
        self.current = most
        self.period, self.first_period, self.longest, self.trials, self.margin = period, period, longest, trials, margin
        self.countdown = period
        self.probe: int | None = None  # the count being tried
        self.samples: dict[int, list[float]] = {}
        self.turn = 0  # which kind of probe comes next
        self._began = 0.0
        self._using = most
        self.moves = 0

    def before(self) -> None:
        using = self.current
        if self.probe is not None and len(self.samples[self.probe]) < len(self.samples[self.current]):
            using = self.probe
        if using != self._using:
            self.set_threads(using)
            self._using = using
        self._began = self.clock()

    def after(self, rows: int) -> None:
        spent = (self.clock() - self._began) / max(rows, 1)
        if self.probe is None:
            self.countdown -= 1
            if self.countdown <= 0 and self.most > 1:
                self._start_probe()
            return
        self.samples[self._using].append(spent)
        if min(len(s) for s in self.samples.values()) >= self.trials:
            self._decide()

    def _start_probe(self) -> None:
        c = self.current
        options = []
        for candidate in (c - 1, c + 1, (c + 1) // 2):
            if 1 <= candidate <= self.most and candidate != c and candidate not in options:
                options.append(candidate)
        self.probe = options[self.turn % len(options)]
        self.turn += 1
        self.samples = {self.current: [], self.probe: []}

    def _decide(self) -> None:
        mine = statistics.median(self.samples[self.current])
        theirs = statistics.median(self.samples[self.probe])
        if theirs < mine * (1 - self.margin):
            self.current, self.period = self.probe, self.first_period
            self.moves += 1
        else:
            self.period = min(self.longest, 2 * self.period)
        self.probe, self.samples, self.countdown = None, {}, self.period

    def apply(self) -> None:
        """Give torch the chosen count (before work the governor does not time, such as a prefill)."""
        if self.probe is None and self._using != self.current:
            self.set_threads(self.current)
            self._using = self.current

    def rest(self) -> None:
        """The engine is idle: torch gets all its threads back for whatever else the process runs, and any probe
        is dropped. The count chosen is kept for the next run (the machine's load outlives a job; `apply` puts it
        back), and re-checked after the first period again."""
        if self._using != self.most:
            self.set_threads(self.most)
        self._using = self.most
        self.probe, self.samples = None, {}
        self.countdown = self.period = self.first_period


def current_core() -> int | None:
    """The CPU the calling thread last ran on (Linux's /proc/thread-self/stat, field 39), None where unknown."""
    try:
        with open("/proc/thread-self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


class CorePinning:
    """A thread setter for ThreadGovernor: calling it with n gives torch n threads; at one thread the calling
    thread (the one that runs the steps) is also pinned to the core it last ran on, within the CPU set it had
    when this was made. Any other count, and `release()`, give the pinned thread that whole set back first:
    threads torch starts inherit their creator's set, and must not all be born on one core."""

    def __init__(self, set_threads: Callable[[int], None], allowed: set[int] | None = None) -> None:
        self.set_threads = set_threads
        self.allowed = set(allowed) if allowed is not None else _own_cpus()
        self.pinned: int | None = None  # the native id of the thread pinned

    def __call__(self, n: int) -> None:
        if n == 1 and len(self.allowed) > 1:
            self.set_threads(1)
            core = current_core()
            core = core if core in self.allowed else min(self.allowed)
            tid = threading.get_native_id()
            if self.pinned is not None and self.pinned != tid:
                self.release()
            try:
                os.sched_setaffinity(tid, {core})
                self.pinned = tid
            except OSError:  # not allowed here (a container's policy): unpinned, as before
                pass
            return
        self.release()
        self.set_threads(n)

    def release(self) -> None:
        if self.pinned is not None:
            try:
                os.sched_setaffinity(self.pinned, self.allowed)
            except OSError:  # the thread has ended
                pass
            self.pinned = None


def _own_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(threading.get_native_id()))
    except (AttributeError, OSError):  # no affinity on this platform: nothing is pinned
        return set()


BF16_FEATURES = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's AVX512-BF16 and AMX; Arm's BF16 extension


def cpu_features() -> set[str] | None:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`), or None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


@functools.cache
def bf16_matmul_is_native() -> bool:
    """Whether this CPU has bf16 matrix instructions. Read from its feature flags, so that every node of one
    kind decides alike whatever its load (the choice changes rounding, and a job's shards must not differ by
    how busy their node was); timed only where the flags cannot be read: a 256x1024x1024 product in bf16
    against fp32, best of five."""
    features = cpu_features()
    if features is not None:
        return bool(features & BF16_FEATURES)
    import torch

    def best(dtype) -> float:
        a = torch.randn(256, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) <= best(torch.float32)


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compute_bf16_linears_in_fp32(model, force: bool = False) -> bool:
    """On a CPU without bf16 units, give a bf16 model's linear layers fp32 weights (the same values) whose
    outputs are rounded back to bf16, when the fp32 copies fit in half the available memory. Returns whether
    it did. The bf16 weights are replaced, not kept beside: the model then holds what an fp32 one would
    in its linear layers."""
    import torch
    from torch import nn

    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return False
    if not force and bf16_matmul_is_native():
        return False
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16]
    extra = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears) * 2
    available = available_memory_bytes()
    if not force and available is not None and extra > available // 2:
        return False
    for m in linears:
        m.weight = nn.Parameter(m.weight.detach().float(), requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().float(), requires_grad=False)
        m.forward = functools.partial(_fp32_linear, m)
    from .model import PersimmonAttention

    for m in model.modules():
        if isinstance(m, PersimmonAttention):
            m.compute_dtype = torch.float32
    return True


def _fp32_linear(module, x):
    import torch.nn.functional as F

    return F.linear(x.float(), module.weight, module.bias).to(x.dtype)
