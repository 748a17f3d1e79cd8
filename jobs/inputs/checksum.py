"""The model's identity: a checksum of the files a load reads, and a pin of those files for the job's workers.

The checksum is a digest of every byte of config.json, the tokenizer and the weight files (and their index);
it is part of a job's fingerprint, so any change to the weights, anywhere in a file, is another model. Files
that do not change the model (a model card, train-head's metrics.json) are not in it: a head retrained from
the same rows with the same seed is the same model. Hashing 16 GB takes a while, so each file's digest is
cached by (path, size, modification time, inode) in the user's cache directory ($PERSIMMON_BATCH_CACHE, else
$XDG_CACHE_HOME/persimmon-batch, else ~/.cache/persimmon-batch): a rerun over an unchanged 8B checkpoint
reads none of its weights.

The pin records, at job start, each model file's size, modification time, device and inode (through links)
with the checksum. A worker checks the pin before and after it loads the model and after each unit: the same
files (a stat each) pass at once; files that differ (another node's copy of the checkpoint) pass only if their
checksum is the job's; otherwise the worker refuses with ModelChanged ("the model changed while the job ran").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from persimmon.files import model_files

from ..errors import ModelChanged
from ..output.paths import cache_dir

CHUNK = 8 << 20
LOUD = 1 << 30  # files big enough that hashing them is worth a line on stderr


def _stat(file: Path) -> dict[str, int]:
    st = file.stat()  # through links: the file whose bytes are read
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dev": st.st_dev, "ino": st.st_ino}


def _file_key(file: Path) -> str:
    st = _stat(file)
    return f"{file.resolve()}|{st['size']}|{st['mtime_ns']}|{st['ino']}"


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
    """A checksum over the names and full contents of the files a load of the checkpoint reads."""
    cache = cache or DigestCache()
    digest = hashlib.sha256()
    for file in model_files(model_dir):
        digest.update(f"{file.name}\0{cache.digest(file)}\n".encode())
    cache.save()
    return digest.hexdigest()[:16]


def pin_model(model_dir: str | Path, checksum: str) -> dict[str, Any]:
    """What a worker checks the model against: the checksum and each file's stat at job start."""
    return {"checksum": checksum, "files": {f.name: _stat(f) for f in model_files(model_dir)}}


def check_pin(model_dir: str | Path, pin: dict[str, Any], cache: DigestCache | None = None) -> None:
    """Raise ModelChanged unless the checkpoint is the one pinned (see the module docstring)."""
    try:
        now = {f.name: _stat(f) for f in model_files(model_dir)}
    except (OSError, ValueError) as exc:
        raise ModelChanged(f"the model changed while the job ran ({exc}); rerun the job") from None
    if now == pin["files"]:
        return
    checksum = model_checksum(model_dir, cache)
    if checksum != pin["checksum"]:
        changed = sorted(set(now) ^ set(pin["files"]) | {n for n in now if now[n] != pin["files"].get(n)})
        raise ModelChanged(f"the model changed while the job ran ({', '.join(changed)} in {model_dir}: checksum "
                           f"{checksum}, the job started with {pin['checksum']}); rerun the job")
