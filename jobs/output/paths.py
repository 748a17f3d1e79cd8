"""Paths on any filesystem pyarrow knows (local, s3://, gs://, hdfs://): resolving a URI, joining, a local
folder's identity (device and inode), which every layer that reads or writes files shares; and this machine's
cache folder (model digests, lease observations)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import UsageError


def expand(uri: str) -> str:
    """A local path with `~` expanded; a URI as it is."""
    return uri if "://" in uri else os.path.expanduser(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI pyarrow understands. Local paths are expanded (`~`) and
    resolved through symlinks."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # pyarrow: ArrowInvalid (a ValueError) for an unknown scheme
            raise UsageError(f"cannot open {uri}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.realpath(expand(uri))


def absolute(uri: str) -> str:
    """A local path made absolute (`~` expanded, symlinks resolved); a URI as it is."""
    return uri if "://" in uri else str(Path(expand(uri)).resolve())


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if base else rel


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (plain path comparison: object stores have no links)."""
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def folder_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of a local folder, None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def existing_chain(path: str) -> list[tuple[str, tuple[int, int]]]:
    """The folder `path` (if it exists) and each existing folder above it, with their (device, inode)."""
    chain, current = [], os.path.abspath(path)
    while True:
        key = folder_key(current)
        if key is not None:
            chain.append((current, key))
        parent = os.path.dirname(current)
        if parent == current:
            return chain
        current = parent


def cache_dir() -> Path:
    if os.environ.get("PERSIMMON_BATCH_CACHE"):
        return Path(os.environ["PERSIMMON_BATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "persimmon-batch"
