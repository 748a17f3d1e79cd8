"""One run owns an output directory at a time: a lease in `_lease/` with the holder's host, pid, start and a
heartbeat.

The lease is a numbered file, `_lease/<generation>.json`, created only if absent: the first run creates
generation 1; a run that finds the newest generation released by its owner, or stale, creates the next one.
Two runs racing for the same generation cannot both create it, so exactly one wins. A holder is stale when
it ran on this machine and its process is gone (at once), or when its file has not been rewritten for the
holder's TTL (any machine). The holder rewrites its file every TTL/4 and watches for a newer generation: a
run whose lease was taken over (its heartbeat stalled past the TTL) learns it and stops before committing.

How "create only if absent" is done, per filesystem:
- local (and NFS): O_CREAT|O_EXCL, atomic.
- S3 and S3-compatible stores: a conditional PUT (If-None-Match: *) through boto3 when it is installed,
  atomic on AWS S3 and servers that implement conditional writes; without boto3, as below.
- anything else (GCS, HDFS, S3 without boto3): best effort. Write, wait SETTLE seconds, read back: the run
  whose lease survived owns the output. Two runs that start within the same instant can both pass only if
  one stalls for longer than SETTLE between its check and its write.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

LEASE_DIR = "_lease"
SETTLE = 2.0  # seconds between writing and reading back a best-effort lease


class OutputBusy(RuntimeError):
    """Another live run holds the output directory."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (with the pid, a process identity pids cannot reuse)."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else ""


def _machine() -> str:
    """hostname + boot id + pid namespace: where a pid means the same process (containers on one host that
    share a hostname still differ in their pid namespace)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{namespace}"


@dataclass
class Holder:
    """Who holds (or held) a lease."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    process_start: str = field(default_factory=lambda: _process_start(os.getpid()))
    machine: str = field(default_factory=_machine)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ttl: float = 120.0

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Holder":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, run {self.run_id}, started {self.started_at}"

    def gone(self) -> bool:
        """True when the holder ran on this machine and its process no longer exists."""
        if self.machine != _machine():
            return False
        return _process_start(self.pid) != self.process_start


class _Creator:
    """Create-if-absent for one filesystem; `atomic` says whether the guarantee is exact."""

    def __init__(self, fs: pafs.FileSystem, uri: str) -> None:
        self.fs = fs
        self.s3 = self._s3_client(uri) if fs.type_name == "s3" else None

    @property
    def atomic(self) -> bool:
        return self.fs.type_name == "local" or self.s3 is not None

    @staticmethod
    def _s3_client(uri: str):
        try:
            import boto3
        except ImportError:
            return None
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(uri).query))
        kwargs: dict[str, Any] = {}
        if query.get("endpoint_override"):
            endpoint = query["endpoint_override"]
            kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{query.get('scheme', 'https')}://{endpoint}"
        if query.get("region"):
            kwargs["region_name"] = query["region"]
        if query.get("access_key"):
            kwargs.update(aws_access_key_id=query["access_key"], aws_secret_access_key=query.get("secret_key"))
        return boto3.client("s3", **kwargs)

    def create(self, path: str, data: bytes, run_id: str) -> bool:
        """Write `data` at `path` unless something is there; True when this call created it."""
        if self.fs.type_name == "local":
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.s3 is not None:
            bucket, key = path.split("/", 1)
            try:
                self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except self.s3.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or \
                        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise
            return True
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        time.sleep(SETTLE)
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode()).get("run_id") == run_id
        except (OSError, ValueError):
            return False


class OutputLease:
    """The lease on one output directory, for one run."""

    def __init__(self, fs: pafs.FileSystem, out_base: str, uri: str, ttl: float = 120.0,
                 holder: Holder | None = None) -> None:
        self.fs, self.dir = fs, f"{out_base.rstrip('/')}/{LEASE_DIR}"
        self.holder = holder or Holder(ttl=ttl)
        self.holder.ttl = ttl
        self.creator = _Creator(fs, uri)
        self.generation = 0
        self.lost: str | None = None  # why this run no longer owns the output, once it does not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def atomic(self) -> bool:
        return self.creator.atomic

    def _path(self, generation: int) -> str:
        return f"{self.dir}/{generation:012d}.json"

    def _generations(self) -> dict[int, pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        found = {}
        for info in infos:
            stem = info.base_name.removesuffix(".json")
            if info.type == pafs.FileType.File and stem.isdigit():
                found[int(stem)] = info
        return found

    def _load(self, generation: int) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self._path(generation)) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None  # being written this instant, or gone

    def _record(self, released: bool = False) -> bytes:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps({**asdict(self.holder), "generation": self.generation, "heartbeat_at": now,
                           "released": released}, indent=1).encode()

    def _staleness(self, record: dict[str, Any] | None, info: pafs.FileInfo) -> str | None:
        """Why the newest lease no longer holds the output, or None while its holder is live."""
        age = time.time() - info.mtime.timestamp()
        if record is None:
            return f"an unreadable lease untouched for {age:.0f} s" if age > self.holder.ttl else None
        if record.get("released"):
            return "released"
        holder = Holder.from_record(record)
        if holder.gone():
            return f"its process is gone ({holder.describe()})"
        ttl = float(record.get("ttl", self.holder.ttl))
        if age > ttl:
            return f"no heartbeat for {age:.0f} s, over its {ttl:.0f} s TTL ({holder.describe()})"
        return None

    def acquire(self) -> str | None:
        """Take the lease or raise OutputBusy naming the holder. Returns a note when a stale lease of an
        earlier run was taken over."""
        self.fs.create_dir(self.dir, recursive=True)
        for _ in range(5):  # another run may win a generation under us: look again
            generations = self._generations()
            newest = max(generations, default=0)
            note = None
            if newest:
                record = self._load(newest)
                why = self._staleness(record, generations[newest])
                if why is None:
                    raise OutputBusy(self._busy_message(record, generations[newest]))
                if why != "released":
                    note = f"took the output over from an earlier run: {why}"
            self.generation = newest + 1
            if self.creator.create(self._path(self.generation), self._record(), self.holder.run_id):
                for old in generations:  # older generations are history now
                    self._delete(self._path(old))
                return note
        raise OutputBusy(f"{self.dir}: could not take the lease after 5 tries: other runs keep taking it")

    def _busy_message(self, record: dict[str, Any] | None, info: pafs.FileInfo) -> str:
        age = time.time() - info.mtime.timestamp()
        if record is None:
            who = "a run that is starting"
            ttl = self.holder.ttl
        else:
            who = f"another run ({Holder.from_record(record).describe()})"
            ttl = float(record.get("ttl", self.holder.ttl))
        output = self.dir.rsplit("/", 1)[0]
        return (f"{output} is in use by {who}, last heartbeat {age:.0f} s ago; try again when it ends "
                f"(its lease goes stale after {ttl:.0f} s without a heartbeat)")

    def holder_now(self) -> str | None:
        """Who holds the output right now (a live, unreleased lease), for `status`; None when nobody."""
        generations = self._generations()
        if not generations:
            return None
        newest = max(generations)
        record = self._load(newest)
        if self._staleness(record, generations[newest]) is not None or record is None:
            return None
        age = time.time() - generations[newest].mtime.timestamp()
        return f"{Holder.from_record(record).describe()}, last heartbeat {age:.0f} s ago"

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def heartbeat(self) -> None:
        """Rewrite this run's lease; note it as lost when a newer generation exists or ours is gone."""
        generations = self._generations()
        newer = [g for g in generations if g > self.generation]
        if newer or self.generation not in generations:
            record = self._load(max(newer)) if newer else None
            taker = Holder.from_record(record).describe() if record else "unknown"
            self.lost = f"another run took the output over ({taker})"
            return
        self._write(self._record())

    def _write(self, data: bytes) -> None:
        path = self._path(self.generation)
        if self.fs.type_name == "local":  # readers never see a half-written file
            temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(temp, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def start_heartbeat(self) -> None:
        interval = self.holder.ttl / 4

        def beat() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                    last_ok = time.monotonic()
                except Exception:  # a storage hiccup: try again next beat, give up past the TTL
                    if time.monotonic() - last_ok > self.holder.ttl:
                        self.lost = f"could not renew the lease for {self.holder.ttl:.0f} s"
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name="persimmon-batch-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the output back (the lease file stays, marked released, so generations only grow)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.generation and not self.lost:
            try:
                self._write(self._record(released=True))
            except OSError:
                pass
