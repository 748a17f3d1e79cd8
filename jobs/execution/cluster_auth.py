"""Token authentication for joining Ray clusters (Ray >= 2.60).

Clusters started with `ray start` require a token from their clients by default; a client without one
retries for minutes before failing. Ray reads RAY_AUTH_MODE when it is imported, so this runs first.
"""

from __future__ import annotations

import os


def token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")) or os.path.exists(
        os.path.expanduser("~/.ray/auth_token"))


def use_token_auth(address: str | None) -> bool:  # also for dashboard addresses (Jobs API)
    """Turn on token mode for joining `address` when a token is at hand and the user has not chosen a mode;
    for an embedded cluster (address None), say "token" explicitly: Ray picks it by default anyway, but then
    warns on every run that it did. Returns whether it changed anything."""
    if "RAY_AUTH_MODE" in os.environ or (address is not None and not token_available()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


def refresh_ray_config() -> None:
    """Have an imported Ray read RAY_AUTH_MODE again: it reads its config when imported and goes back to
    that on shutdown, so every ray.init after the environment changed (a backfill's second date) needs it."""
    if "RAY_AUTH_MODE" not in os.environ:
        return
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
