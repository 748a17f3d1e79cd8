"""Joining Ray: started here for a run (the embedded default) or a cluster joined by address, refused at once
where nothing answers, and left as it was found."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

import ray

from pipelines.errors import one_line

from ..errors import Interrupted, UsageError
from .cluster_auth import refresh_ray_config, token_available, use_token_auth
from .signals import StopSignals, received

gone: list[str] = []  # set when the cluster died under a run: no more Ray calls in this process
# Ray starts its workers at niceness 15, so that its own daemons stay responsive on a saturated node; our actors
# are the work, and at 15 any other process on the machine takes nearly all the CPU from them (importing torch
# in an actor took 71 s instead of 2.5 s beside two busy processes; 4.3 s at niceness 0). The Ray started here
# runs its workers at 0, unless the user set Ray's own variable; a cluster joined is as its nodes were started.
NICENESS_VARIABLE = "RAY_worker_niceness"


@contextmanager
def joined(address: str | None, needed: bool, signals: StopSignals) -> Iterator[None]:
    """Ray for the span of a run (`needed`: a run with nothing to do never starts it). Ray started here is shut
    down at the end (unless it died); a cluster joined, or a Ray this process was already on, is left running."""
    embedded = address is None and not ray.is_initialized()
    try:
        if needed:
            connect(address)
            signals.install()  # ray.init installed its own SIGTERM handler
        yield
    except SystemExit as exc:  # Ray's own SIGTERM handler, while ray.init runs, exits with the signal
        if exc.code in (signal.SIGTERM, signal.SIGINT):
            received.append(exc.code)
            raise Interrupted(exc.code) from None
        raise
    finally:
        signals.cleanup()
        if embedded and ray.is_initialized() and not gone:
            ray.shutdown()


def connect(address: str | None) -> None:
    """Start Ray here (address None) or join a cluster. A process already connected to Ray (a notebook, a
    Ray job's driver) runs on that Ray; an --address naming another cluster is refused, never ignored."""
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (None, "auto") and _host_port(address) != _host_port(current):
            raise UsageError(f"cannot join the Ray cluster at {address}: this process is already connected to "
                             f"the Ray cluster at {current} (call ray.shutdown() first, or leave out --address)")
        return
    use_token_auth(address)
    refresh_ray_config()
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=True,
                 **({} if NICENESS_VARIABLE in os.environ else {"_system_config": {"worker_niceness": 0}}))
        return
    _reachable(address)
    try:
        ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, ray.exceptions.RayError) as exc:
        hint = "" if token_available() else (
            " (clusters started with `ray start` use token authentication: set RAY_AUTH_TOKEN to the head "
            "node's token, or copy its ~/.ray/auth_token here)")
        raise UsageError(f"cannot join the Ray cluster at {address}: {one_line(exc, first=True)}{hint}") from None


def _host_port(address: str | None) -> tuple[str, str] | None:
    """(host as an IP address, port) of a HOST:PORT address; None for what is not one (ray://...)."""
    import socket

    if not address or "://" in address or ":" not in address:
        return None
    host, port = address.rsplit(":", 1)
    try:
        return socket.gethostbyname(host), port
    except OSError:
        return host, port


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a cluster address where nothing answers (ray.init would retry for minutes)."""
    import socket

    if address.startswith("ray://"):
        return
    try:
        from ray._private.services import canonicalize_bootstrap_address

        bootstrap = canonicalize_bootstrap_address(address)
    except Exception as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: {one_line(exc, first=True)}") from None
    if not bootstrap:
        raise UsageError(f"cannot join the Ray cluster at {address}: no running cluster found on this machine")
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: nothing answers at {bootstrap} "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
