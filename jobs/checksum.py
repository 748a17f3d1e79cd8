"""The model checksum: a digest of every byte of a checkpoint directory (config, tokenizer, weights).

It is part of a job's fingerprint, so any change to the weights, anywhere in a file, is another model.
Hashing 16 GB takes a while, so each file's digest is cached by (path, size, modification time, inode) in
the user's cache directory ($PERSIMMON_BATCH_CACHE, else $XDG_CACHE_HOME/persimmon-batch, else
~/.cache/persimmon-batch): a rerun over an unchanged 8B checkpoint reads none of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

CHUNK = 8 << 20
LOUD = 1 << 30  # files big enough that hashing them is worth a line on stderr


def cache_dir() -> Path:
    if os.environ.get("PERSIMMON_BATCH_CACHE"):
        return Path(os.environ["PERSIMMON_BATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "persimmon-batch"


def _file_key(file: Path) -> str:
    st = file.stat()
    return f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """File digests keyed by path, size, mtime and inode, in one small JSON file."""

    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder or cache_dir()) / "file-digests.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, file: Path) -> str:
        key = _file_key(file)
        if key not in self.entries:
            size = file.stat().st_size
            if size > LOUD:
                print(f"computing the checksum of {file} ({size / 1e9:.1f} GB): once, then cached in {self.path}",
                      file=sys.stderr, flush=True)
            self.entries[key] = file_digest(file)
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        """Write the cache atomically; a cache that cannot be written only costs a rehash next time."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def model_checksum(model_dir: str | Path, cache: DigestCache | None = None) -> str:
    """A checksum over the names and full contents of a checkpoint directory's files (hidden files aside)."""
    root = Path(model_dir)
    cache = cache or DigestCache()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.name}\0{cache.digest(file)}\n".encode())
    cache.save()
    return digest.hexdigest()[:16]
