"""One run owns an output directory at a time, whatever the command: a lease in `_lease/` with the holder's
host, pid, run id and a heartbeat counter.

The lease is a numbered file, `_lease/<generation>.json`, created only if absent: the first run creates
generation 1; a run that finds the newest generation released by its owner, or stale, creates the next one.
Two runs racing for the same generation cannot both create it, so exactly one wins.

Staleness is judged on the observer's own clock, never by comparing another machine's timestamps: the holder
rewrites its record every TTL/4 with its counter one higher; an observer that sees the record unchanged for
the holder's TTL, measured on its own monotonic clock (CLOCK_BOOTTIME, remembered across runs of this machine
in the user cache), may take it over. A holder on this machine whose process is gone is stale at once, and
one whose process lives is busy at once. The TTL a record states is bounded to [1 s, MAX_TTL]. An observer
waits at most its own TTL to watch a record: a change means the holder lives (refused, exit 75); a record
unchanged past the holder's TTL is taken over; otherwise it refuses, and what it saw counts for the next try.

The holder watches for a newer generation, or its file gone: a run whose lease was taken over (its
heartbeat stalled past the TTL) or whose output folder was removed learns it and commits nothing more; it
also checks right before a commit when its last confirmed heartbeat is older than TTL/4.

How "create only if absent" is done, per filesystem:
- local (and NFS): O_CREAT|O_EXCL, atomic.
- S3 and S3-compatible stores: a conditional PUT (If-None-Match: *) through boto3 when it is installed,
  atomic on AWS S3 and servers that implement conditional writes; without boto3, as below.
- anything else (GCS, HDFS, S3 without boto3): best effort. Write, wait SETTLE seconds, read back: the run
  whose lease survived owns the output. Two runs that start within the same instant can both pass only if
  one stalls for longer than SETTLE between its check and its write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ..errors import LeaseLost, OutputBusy
from .commit import write_whole

LEASE_DIR = "_lease"
LEASE_NAME = re.compile(r"\d{12,}\.json(\.[0-9a-f]{8}\.tmp)?")
SETTLE = 2.0  # seconds between writing and reading back a best-effort lease
MIN_TTL, MAX_TTL = 1.0, 3600.0
CONFIRM_EVERY = 2.0  # seconds: how stale a confirmation of the lease a commit may rely on

__all__ = ["LEASE_DIR", "Holder", "LeaseLost", "OutputBusy", "OutputLease"]


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


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def this_machine() -> str:
    """hostname + boot id + pid namespace: where a pid means the same process (containers on one host that
    share a hostname still differ in their pid namespace)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{_boot_id()}|{namespace}"


def _uptime() -> float:
    """This machine's clock since boot: monotonic across processes, unmoved by changes of the wall clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def bounded_ttl(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        value = default
    return min(max(float(value), MIN_TTL), MAX_TTL)


@dataclass
class Holder:
    """Who holds (or held) a lease."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    process_start: str = field(default_factory=lambda: _process_start(os.getpid()))
    machine: str = field(default_factory=this_machine)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ttl: float = 120.0
    command: str = ""  # what holds it: classify, train-head, ...

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Holder":
        """The holder a record names; fields of the wrong type (a hand-edited record) are left out."""
        kinds = {"pid": int, "ttl": (int, float)}
        values = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        return cls(**{k: v for k, v in values.items() if isinstance(v, kinds.get(k, str)) and not isinstance(v, bool)})

    def describe(self) -> str:
        what = f" ({self.command})" if self.command else ""
        return f"host {self.host}, pid {self.pid}, run {self.run_id}, started {self.started_at}{what}"

    def local(self) -> bool:
        return self.machine == this_machine()

    def gone(self) -> bool:
        """True when the holder ran on this machine and its process no longer exists."""
        return self.local() and _process_start(int(self.pid)) != self.process_start


class Observations:
    """What this machine saw of other runs' lease records: per record, a digest of its bytes and when (on this
    boot's clock) it was first seen with them. A record seen unchanged by several runs in a row adds up."""

    def __init__(self, folder: Path | None = None) -> None:
        from .paths import cache_dir

        self.path = (folder or cache_dir()) / "lease-observations.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def unchanged_for(self, key: str, value: str) -> float:
        """Seconds this machine has seen `key` hold `value` (0 on first sight or after a change)."""
        data = self._load()
        now, boot = _uptime(), _boot_id()
        seen = data.get(key)
        if isinstance(seen, dict) and seen.get("value") == value and seen.get("boot") == boot and \
                isinstance(seen.get("since"), (int, float)) and seen["since"] <= now:
            return now - seen["since"]
        data[key] = {"value": value, "boot": boot, "since": now}
        self._save(dict(list(data.items())[-200:]))
        return 0.0

    def _save(self, data: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
            temp.write_text(json.dumps(data))
            os.replace(temp, self.path)
        except OSError:
            pass  # only costs a longer watch next time


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
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except BaseException:
                os.unlink(path)
                raise
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
                 holder: Holder | None = None, command: str = "", observations: Observations | None = None,
                 stream=None) -> None:
        self.fs, self.out_base, self.dir = fs, out_base.rstrip("/"), f"{out_base.rstrip('/')}/{LEASE_DIR}"
        self.holder = holder or Holder(ttl=ttl, command=command)
        self.holder.ttl = bounded_ttl(ttl, 120.0)
        self.creator = _Creator(fs, uri)
        self.observations = observations or Observations()
        self.stream = stream or sys.stderr
        self.generation = 0
        self.beat = 0
        self.created_output = False  # the output folder did not exist before this lease
        self.lost: str | None = None  # why this run no longer owns the output, once it does not
        self._confirmed = 0.0  # monotonic time of the last heartbeat that found the lease ours
        self._lock = threading.Lock()
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
            if info.type == pafs.FileType.File and stem.isdigit() and info.base_name.endswith(".json"):
                found[int(stem)] = info
        return found

    def _load(self, generation: int) -> tuple[bytes | None, dict[str, Any] | None]:
        """(raw bytes, parsed record or None when unparsable); (None, None) when the file is gone."""
        try:
            with self.fs.open_input_stream(self._path(generation)) as f:
                raw = f.read()
        except OSError:
            return None, None
        try:
            record = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return raw, None
        return raw, record if isinstance(record, dict) else None

    def _record(self, released: bool = False) -> bytes:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # for people reading it; nobody compares it
        return json.dumps({**asdict(self.holder), "generation": self.generation, "beat": self.beat,
                           "heartbeat_at": now, "released": released}, indent=1).encode()

    def _judge(self, generation: int, wait: float) -> str | None:
        """Why the lease `generation` no longer holds the output ("released" or a note for the takeover);
        raises OutputBusy while its holder lives. May watch the record for up to `wait` seconds."""
        raw, record = self._load(generation)
        if raw is None:
            return "released"  # gone between listing and reading: look again
        if record is not None and record.get("released") is True:
            return "released"
        holder = Holder.from_record(record) if record is not None else None
        who = f"another run ({holder.describe()})" if holder else "another run (an unreadable lease record)"
        if holder is not None and holder.local():
            if holder.gone():
                return f"its process is gone ({holder.describe()})"
            raise OutputBusy(f"{self.out_base} is in use by {who}, running on this machine; try again when it ends")
        ttl = bounded_ttl(record.get("ttl") if record else None, self.holder.ttl)
        key = f"{self.fs.type_name}:{self._path(generation)}"
        digest = hashlib.sha256(raw).hexdigest()
        unchanged = self.observations.unchanged_for(key, digest)
        budget = min(wait, ttl)
        if unchanged < ttl and budget > 2:
            self.stream.write(f"{self.out_base} is held by {who}: watching its heartbeat for up to "
                              f"{min(budget, ttl - unchanged):.0f} s to tell whether it is alive\n")
            self.stream.flush()
        watch_start = time.monotonic()
        poll = min(1.0, ttl / 8)
        while unchanged < ttl and time.monotonic() - watch_start < budget:
            time.sleep(min(poll, max(0.0, ttl - unchanged)))
            now_raw, _ = self._load(generation)
            if now_raw is None:
                return "released"
            if now_raw != raw:
                raise OutputBusy(f"{self.out_base} is in use by {who}, whose heartbeat changed while this run "
                                 "watched; try again when it ends")
            unchanged = self.observations.unchanged_for(key, digest)
        if unchanged >= ttl:
            return f"its heartbeat stayed unchanged for {unchanged:.0f} s, over its {ttl:.0f} s TTL ({who})"
        raise OutputBusy(f"{self.out_base} is in use by {who}: its heartbeat has been unchanged for "
                         f"{unchanged:.0f} s so far; the lease goes stale after {ttl:.0f} s without a change; try "
                         "again later")

    def acquire(self, wait: float | None = None) -> str | None:
        """Take the lease or raise OutputBusy naming the holder. Returns a note when a stale lease of an
        earlier run was taken over. `wait`: how long to watch another machine's record (default: this
        lease's TTL)."""
        wait = self.holder.ttl if wait is None else wait
        if self.fs.get_file_info(self.out_base).type == pafs.FileType.NotFound:
            self.created_output = True
        self.fs.create_dir(self.dir, recursive=True)
        for _ in range(5):  # another run may win a generation under us: look again
            generations = self._generations()
            newest = max(generations, default=0)
            note = None
            if newest:
                why = self._judge(newest, wait)
                if why != "released":
                    note = f"took the output over from an earlier run: {why}"
            self.generation = newest + 1
            if self.creator.create(self._path(self.generation), self._record(), self.holder.run_id):
                self._confirmed = time.monotonic()
                for old in generations:  # older generations are history now
                    self._delete(self._path(old))
                return note
        raise OutputBusy(f"{self.dir}: could not take the lease after 5 tries: other runs keep taking it")

    def holder_now(self) -> str | None:
        """Who holds the output right now (an unreleased lease whose holder is not known to be gone), for
        `status`, which does not wait to watch a heartbeat; None when nobody."""
        generations = self._generations()
        if not generations:
            return None
        raw, record = self._load(max(generations))
        if record is None or record.get("released") is True:
            return None
        holder = Holder.from_record(record)
        if holder.gone():
            return None
        return holder.describe() + ("" if holder.local() else " (on another machine: liveness not checked)")

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:
            pass

    def heartbeat(self) -> None:
        """Rewrite this run's lease; note it as lost when a newer generation exists or ours is gone."""
        with self._lock:
            if self.lost:
                return
            generations = self._generations()
            newer = [g for g in generations if g > self.generation]
            if newer:
                _, record = self._load(max(newer))
                taker = Holder.from_record(record).describe() if record else "unknown"
                self.lost = f"another run took the output over ({taker})"
                return
            if self.generation not in generations:
                self.lost = (f"this run's lease {self._path(self.generation)} is gone (was the output folder "
                             "removed or moved?)")
                return
            _, record = self._load(self.generation)
            if record is None or record.get("run_id") != self.holder.run_id:  # a new folder in its place
                taker = Holder.from_record(record).describe() if record else "an unreadable record"
                self.lost = (f"this run's lease {self._path(self.generation)} now belongs to another run ({taker}): "
                             "the output folder was replaced")
                return
            self.beat += 1
            self._write(self._record())
            self._confirmed = time.monotonic()

    def confirm(self, force: bool = False) -> None:
        """Right before a commit (and before the manifest and `_SUCCESS`, with force): raise LeaseLost unless
        the lease is still ours. A commit checks synchronously when the last confirmation is older than
        CONFIRM_EVERY seconds: one listing and one read at most that often, however fast commits come."""
        if not self.lost and (force or time.monotonic() - self._confirmed > min(CONFIRM_EVERY, self.holder.ttl / 4)):
            try:
                self.heartbeat()
            except OSError as exc:
                if time.monotonic() - self._confirmed > self.holder.ttl:
                    self.lost = f"could not renew the lease for {self.holder.ttl:.0f} s ({exc})"
        if self.lost:
            raise LeaseLost(self.lost)

    def _write(self, data: bytes) -> None:
        path = self._path(self.generation)
        write_whole(self.fs, path, data, f"{path}.{uuid.uuid4().hex[:8]}.tmp")

    def start_heartbeat(self) -> None:
        interval = self.holder.ttl / 4

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except Exception as exc:  # a storage hiccup: try again next beat, give up past the TTL
                    if time.monotonic() - self._confirmed > self.holder.ttl:
                        self.lost = f"could not renew the lease for {self.holder.ttl:.0f} s ({exc})"
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name="persimmon-batch-lease", daemon=True)
        self._thread.start()

    def release(self, discard: bool = False) -> None:
        """Give the output back (the lease file stays, marked released, so generations only grow). With
        `discard` (a run refused before it wrote anything), an output folder this lease created is removed
        again, leaving nothing behind."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.generation or self.lost:
            return
        if discard and self.created_output:
            try:
                self.fs.delete_dir(self.dir)
                if not self.fs.get_file_info(pafs.FileSelector(self.out_base, allow_not_found=True)):
                    self.fs.delete_dir(self.out_base)
                return
            except OSError:
                pass
        try:
            self._write(self._record(released=True))
        except OSError:
            pass
