"""Stopping a run: SIGTERM (how schedulers and Kubernetes stop a job) ends it as Ctrl-C does, and never in the
middle of it giving its output back (Ctrl-C keeps Python's own handler: a KeyboardInterrupt wherever it lands).

Handlers are the process's, so what they saw is the process's too: `received` lists every stopping signal (Ray
may turn ours into a plain KeyboardInterrupt; `signal_of` still names it).
"""

from __future__ import annotations

import signal
import threading

from ..errors import Interrupted

received: list[int] = []  # the stopping signals this process received, in order
_cleaning = threading.Event()  # set while a run gives its output back: a signal then waits for the end of it


def signal_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT where none was recorded)."""
    return getattr(exc, "signum", None) or (received[-1] if received else signal.SIGINT)


def _handler(signum, frame) -> None:
    received.append(signum)
    if not _cleaning.is_set():
        raise Interrupted(signum)


class StopSignals:
    """The span of one run. Inside it SIGTERM raises Interrupted as Ctrl-C does, except once `cleanup()` is
    called: from then on a signal is only recorded, and raised as Interrupted when the span ends (carrying
    `result`, the run's counts, for the CLI to print), after the output was given back."""

    def __init__(self) -> None:
        self.result = None  # the run's JobResult, once there is one

    def install(self) -> None:
        """(Re)install the SIGTERM handler: Ray installs one of its own when it starts. Only the main thread
        can; elsewhere the caller's handlers stay."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _handler)

    def cleanup(self) -> None:
        """The run is giving its output back (stopping Ray, removing temporaries, releasing the lease)."""
        _cleaning.set()

    def __enter__(self) -> "StopSignals":
        self.install()
        self.before = len(received)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _cleaning.clear()
        if exc_type is None and len(received) > self.before:
            stopped = Interrupted(received[-1])  # stopped while it gave the output back, or caught on the way
            if self.result is not None:
                self.result.interrupted = stopped.signum
                stopped.result = self.result  # the CLI prints what the run did
            raise stopped
