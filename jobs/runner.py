"""The runner: the only module that drives Ray.

It discovers the input shards, reads the output's manifest (skipping what is committed, refusing a changed
model or options unless overwrite), starts Ray on this machine or joins a cluster, and keeps a pool of
ShardWorker actors busy: each actor pulls the next work unit when it is free. A finished unit is committed
(atomic rename) and recorded in the manifest; a unit whose actor died (killed, out of memory) is redone on
a fresh actor; a unit that fails max_attempts times is marked failed with its reason while the others
finish. The driver only moves file names and counts, never a shard's rows.
"""

from __future__ import annotations

import collections
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from persimmon import __version__

from .cluster_auth import token_available, use_token_auth
from .shards import (
    Manifest,
    check_text_column,
    WorkUnit,
    clean_temporaries,
    commit,
    committed_fingerprint,
    discover,
    output_name,
    plan_units,
    resolve,
)
from .spec import JobSpec, model_checksum
from .worker import UNIT_COUNTS, ShardWorker

CPU_THREADS_PER_ACTOR = 4  # default CPU actor size when the number of actors is not given


class JobConflict(ValueError):
    """The output holds results of a different model or options; rerun with overwrite to replace them."""


@dataclass
class JobResult:
    shards: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    rows: int = 0
    errors: int = 0
    truncated: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    interrupted: bool = False
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.interrupted

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tokens = (self.real_tokens + self.generated_tokens) / self.seconds if self.seconds else 0.0
        waste = self.padded_tokens / self.real_tokens if self.real_tokens else 1.0
        lines = [
            f"shards: {self.done} done ({self.skipped} already committed), {self.failed} failed, of {self.shards}",
            f"rows: {self.rows} processed, {self.errors} with errors, {self.truncated} truncated",
            f"throughput: {rate:.1f} rows/s, {tokens:.0f} tokens/s, padding waste {waste:.3f} "
            f"(startup {self.startup_seconds:.1f} s, processing {self.seconds:.1f} s)",
        ]
        lines += [f"failed: {shard}: {reason}" for shard, reason in self.failures.items()]
        if self.interrupted:
            lines.append("interrupted: rerun the same command to resume")
        return "\n".join(lines)


class Progress:
    """A progress line on a terminal, or a plain log line per committed shard elsewhere."""

    def __init__(self, total_rows: int, total_shards: int, stream=None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_rows, self.total_shards = total_rows, total_shards
        self.rows = self.done = self.failed = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, rows: int) -> None:
        """Rows processed so far, all units together."""
        self.rows = rows
        self.draw()

    def shard_done(self, shard: str, entry: dict[str, Any]) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write(f"committed {shard}: {entry['rows']} rows, {entry['errors']} errors, "
                              f"{entry['seconds']:.1f} s on node {entry['node'][:12]}\n")
        self.draw(force=True)

    def shard_failed(self, shard: str, reason: str) -> None:
        self.failed += 1
        if not self.tty:
            self.stream.write(f"FAILED {shard}: {reason}\n")
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.tty or (not force and now - self.last_draw < 0.5):
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = self.rows / elapsed if elapsed else 0.0
        left = max(self.total_rows - self.rows, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate else "--:--:--"
        width = 24
        filled = int(width * self.rows / self.total_rows) if self.total_rows else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.rows}/{self.total_rows} rows "
                          f"{rate:.1f} rows/s | shards {self.done}/{self.total_shards} done, {self.failed} failed "
                          f"| ETA {eta} ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw(force=True)
            self.stream.write("\n")


class RowCounter:
    """Rows processed so far per work unit, reported by the workers after each record batch (a Ray actor)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def add(self, key: str, rows: int) -> None:
        self.rows[key] = self.rows.get(key, 0) + rows

    def reset(self, key: str) -> None:
        self.rows.pop(key, None)  # a failed attempt's rows will be processed again

    def total(self) -> int:
        return sum(self.rows.values())


def reporter(counter):
    """A picklable report(key, rows) for the workers that feeds the counter actor without waiting."""
    def report(key: str, rows: int) -> None:
        counter.add.remote(key, rows)
    return report


def connect(address: str | None) -> bool:
    """Start Ray here (address None) or join a cluster; returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        return True
    if use_token_auth(address):
        try:  # Ray read its config when imported: have it read the environment again
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as exc:
        hint = "" if token_available() else (
            " (clusters started with `ray start` use token authentication: set RAY_AUTH_TOKEN to the head "
            "node's token, or copy its ~/.ray/auth_token here)")
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {exc}{hint}") from exc
    return False


def actor_layout(spec: JobSpec) -> tuple[int, dict[str, Any], str, int | None]:
    """(actors, Ray resource options, device, torch threads) from the cluster's resources and the spec."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), int(resources.get("CPU", 1))
    r = spec.runner
    if gpus >= 1 and r.gpus_per_actor > 0:
        actors = r.actors or max(1, int(gpus // r.gpus_per_actor))
        return actors, {"num_gpus": r.gpus_per_actor, "num_cpus": 1}, "cuda", None
    actors = r.actors or max(1, cpus // CPU_THREADS_PER_ACTOR)
    threads = max(1, cpus // actors)
    return actors, {"num_cpus": threads}, "cpu", threads


def run_job(spec: JobSpec, stream=None, tty: bool | None = None,
            on_commit: Callable[[str], None] | None = None) -> JobResult:
    """Run a job to the end (or Ctrl-C); returns its counts. Raises ValueError / FileNotFoundError /
    JobConflict / ConnectionError before any work when the spec, input, output or cluster are wrong."""
    spec.validate()
    started = time.perf_counter()
    in_fs, in_base, shards = discover(spec.input)
    check_text_column(in_fs, in_base, shards, spec.text_column)
    out_fs, out_base = resolve(spec.output)
    checksum = model_checksum(spec.model)
    fingerprint = spec.fingerprint(checksum)
    manifest = Manifest.load(out_fs, out_base)
    if manifest is not None and manifest.data.get("fingerprint") != fingerprint and not spec.overwrite:
        raise JobConflict(
            f"{spec.output} holds results of another model or options (fingerprint {manifest.data.get('fingerprint')}, "
            f"this job {fingerprint}); use --overwrite to replace them, or another output directory"
        )
    if manifest is None or manifest.data.get("fingerprint") != fingerprint:
        manifest = Manifest(out_fs, out_base, {"shards": {}})
    manifest.data.update(
        fingerprint=fingerprint, model={"path": spec.model, "checksum": checksum}, spec=spec.to_dict(),
        package_version=__version__, input=spec.input, output=spec.output,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    manifest.clear_success()
    clean_temporaries(out_fs, out_base)

    result = JobResult(shards=len(shards))
    todo: list[str] = []
    for shard in shards:
        entry = manifest.shards.get(shard, {})
        final = output_name(shard)
        if committed_fingerprint(out_fs, out_base, final) == fingerprint:
            if entry.get("state") != "done":  # committed by a run that died before recording it
                manifest.shards[shard] = {**entry, "state": "done", "output": final, "adopted": True}
            result.skipped += 1
            result.done += 1
            continue
        manifest.shards[shard] = {"state": "pending", "output": final}
        todo.append(shard)
    manifest.save()
    if not todo:
        manifest.mark_success()
        result.startup_seconds = time.perf_counter() - started
        return result

    units = [u for shard in todo for u in plan_units(in_fs, in_base, shard, spec.runner.rows_per_unit)]
    started_ray = connect(spec.runner.address)
    try:
        return _dispatch(spec, fingerprint, manifest, units, in_fs, in_base, out_fs, out_base, result,
                         started, stream, tty, on_commit)
    finally:
        if started_ray:
            ray.shutdown()


def _dispatch(spec, fingerprint, manifest, units, in_fs, in_base, out_fs, out_base, result, started, stream,
              tty, on_commit) -> JobResult:
    count, resources, device, threads = actor_layout(spec)
    count = min(count, len(units))
    remote = ray.remote(ShardWorker).options(max_restarts=0, scheduling_strategy="SPREAD", **resources)

    actors: list[Any] = []
    counter = ray.remote(RowCounter).options(num_cpus=0).remote()
    report = reporter(counter)

    def new_actor():
        actor = remote.remote(spec, fingerprint, in_fs, in_base, out_fs, out_base, device, threads, report)
        actors.append(actor)
        return actor

    for _ in range(count):
        new_actor()
    try:
        ray.get([a.pid.remote() for a in actors])  # models loaded: what follows is processing time
    except ray.exceptions.RayActorError as exc:
        cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
        last = str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause)
        raise RuntimeError(f"the workers could not load the model: {last}") from None
    result.startup_seconds = time.perf_counter() - started
    processing = time.perf_counter()

    queue = collections.deque(units)
    attempts: collections.Counter[str] = collections.Counter()
    parts: dict[str, dict[int, dict]] = collections.defaultdict(dict)  # shard -> finished slices' results
    merged_stats: dict[str, dict] = {}  # shard -> summed counts, while its slices are being concatenated
    failed_shards: set[str] = set()
    inflight: dict[Any, tuple[Any, Any]] = {}
    idle = list(actors)
    progress = Progress(sum(u.rows for u in units), result.shards - result.skipped, stream, tty)

    def record_done(shard: str, temp: str, stats: dict) -> None:
        final = output_name(shard)
        commit(out_fs, out_base, temp, final)
        entry = {"state": "done", "output": final, "attempts": attempts[shard] + 1, **stats}
        manifest.shards[shard] = entry
        manifest.save()
        result.done += 1
        for key in UNIT_COUNTS:
            setattr(result, key, getattr(result, key) + stats.get(key, 0))
        progress.shard_done(shard, entry)
        if on_commit is not None:
            on_commit(shard)

    def record_failed(shard: str, reason: str) -> None:
        failed_shards.add(shard)
        manifest.shards[shard] = {"state": "failed", "output": output_name(shard), "error": reason,
                                  "attempts": spec.runner.max_attempts}
        manifest.save()
        result.failed += 1
        result.failures[shard] = reason
        progress.shard_failed(shard, reason)

    try:
        while queue or inflight:
            while idle and queue:
                task = queue.popleft()
                if isinstance(task, WorkUnit) and task.shard in failed_shards:
                    continue
                actor = idle.pop()
                ref = actor.merge.remote(*task) if isinstance(task, tuple) else actor.process.remote(task)
                inflight[ref] = (actor, task)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            progress.update(ray.get(counter.total.remote()))  # rows through the pipeline so far, live
            for ref in ready:
                actor, task = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # killed, out of memory: a fresh actor redoes it
                    out = {"ok": False, "error": f"actor died: {exc.__class__.__name__}: {str(exc)[:300]}"}
                    actor = new_actor()
                except ray.exceptions.RayError as exc:
                    out = {"ok": False, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
                idle.append(actor)
                shard = task[0] if isinstance(task, tuple) else task.shard
                key = shard if isinstance(task, tuple) else task.key
                if not out["ok"]:
                    counter.reset.remote(key)
                    attempts[key] += 1
                    if attempts[key] < spec.runner.max_attempts:
                        queue.append(task)
                    elif shard not in failed_shards:
                        record_failed(shard, out["error"])
                    continue
                if isinstance(task, tuple):  # a merged sliced shard
                    record_done(shard, out["temp"], merged_stats.pop(shard))
                    continue
                stats = {k: v for k, v in out.items() if k not in ("ok", "temp")}
                if task.parts == 1:
                    record_done(shard, out["temp"], stats)
                    continue
                done = parts[shard]
                done[task.part] = out
                if len(done) == task.parts:  # all slices in: one actor concatenates them, in order
                    slices = [parts.pop(shard)[i] for i in range(task.parts)]
                    merged = {k: sum(s.get(k, 0) for s in slices) for k in (*UNIT_COUNTS, "seconds")}
                    merged.update(node=",".join(sorted({s["node"] for s in slices})), parts=task.parts)
                    merged_stats[shard] = merged
                    queue.appendleft((shard, [s["temp"] for s in slices]))
    except KeyboardInterrupt:
        result.interrupted = True
        for actor in actors:  # stops their units mid-way; the temporaries are removed below
            ray.kill(actor)
    finally:
        progress.close()
        result.seconds = time.perf_counter() - processing
        counts = manifest.counts()
        manifest.data["summary"] = {**counts, "rows": result.rows, "errors": result.errors,
                                    "truncated": result.truncated, "seconds": round(result.seconds, 3),
                                    "startup_seconds": round(result.startup_seconds, 3)}
        manifest.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest.save()
        if counts["done"] == result.shards:
            manifest.mark_success()
        clean_temporaries(out_fs, out_base)
    return result


def submission_id(name: str, date: str) -> str:
    """The Ray job id of a job file's run for a date: the same trigger twice gets the same id."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{name}-{date}").strip("-")


class AlreadySubmitted(RuntimeError):
    """Ray already has a job with this submission id: this date's run was triggered before."""


def submit_job(job_text: str, name: str, date: str, address: str) -> str:
    """Send `persimmon-batch run` of a job file for one date to a cluster through the Ray Jobs API; the
    job file travels as the job's working directory. Returns the submission id."""
    from ray.job_submission import JobSubmissionClient

    sid = submission_id(name, date)
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="persimmon-batch-job-") as folder:
        Path(folder, "job.toml").write_text(job_text)
        try:
            client.submit_job(
                entrypoint=f"persimmon-batch run job.toml --date {date} --address auto",
                runtime_env={"working_dir": folder}, submission_id=sid,
                metadata={"persimmon_batch_job": name, "date": date},
            )
        except RuntimeError as exc:
            if "already exists" in str(exc) or "already been submitted" in str(exc):
                raise AlreadySubmitted(f"job {sid} was already submitted to {address}; Ray refused it again "
                                       f"(status: {client.get_job_status(sid)})") from None
            raise
    return sid


def follow_job(sid: str, address: str, stream=None) -> bool:
    """Print a submitted job's logs as they grow until it ends; returns whether it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    stream = stream or sys.stdout
    client = JobSubmissionClient(address)
    shown = 0
    while True:
        status = client.get_job_status(sid)
        logs = client.get_job_logs(sid)
        stream.write(logs[shown:])
        stream.flush()
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status == JobStatus.SUCCEEDED
        time.sleep(1.0)
