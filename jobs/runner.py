"""The runner: the only module that drives Ray.

run_job checks the input and output, takes the output's lease (one run per output directory), reads the
manifest (refusing a changed model or options unless overwrite), plans the run (jobs/plan.py), starts Ray on
this machine or joins a cluster, and keeps a pool of ShardWorker actors busy: each actor pulls the next work
unit when it is free. A finished unit is committed (atomic rename) and recorded; a unit whose actor died
(killed, out of memory) is redone on a fresh actor; a unit that cannot succeed (the input itself is wrong) is
failed at once, and one that fails max_attempts times is failed with its reason while the others finish.
Progress is best effort: losing the progress actor never decides a job's fate. The driver only moves
file names and counts, never a shard's rows.
"""

from __future__ import annotations

import collections
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from persimmon import __version__

from .checksum import model_checksum
from .cluster_auth import refresh_ray_config, token_available, use_token_auth
from .lease import OutputBusy, OutputLease
from .manifest import Manifest
from .plan import Plan, check_text_column, plan_run
from .shards import WorkUnit, absolute, commit, discover, output_name, output_overlap, remove_temporaries, resolve
from .spec import JobSpec
from .worker import UNIT_COUNTS, ShardWorker, UnitResult

CPU_THREADS_PER_ACTOR = 4  # default CPU actor size when the number of actors is not given
LISTED = 20  # shards named one by one in a summary section before "and N more"

__all__ = ["JobConflict", "JobResult", "OutputBusy", "run_job", "signal_of", "submit_job", "follow_job"]


class JobConflict(ValueError):
    """The output holds results of a different model or options; rerun with overwrite to replace them."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (how schedulers and Kubernetes stop a job): stop, keep what is committed."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LeaseLost(RuntimeError):
    """Another run took the output over (this run's heartbeat stalled past its TTL)."""


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
    nonfinite: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    startup_parts: dict[str, float] = field(default_factory=dict)  # plan, ray, workers: where startup went
    interrupted: int = 0  # the signal that stopped the run (0: it was not stopped)
    lost: str | None = None  # why this run lost the output to another one
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the run found (changed / removed shards, takeovers)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.interrupted and not self.lost

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        if self.lost:
            return 75
        return 0 if self.ok else 1

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tokens = (self.real_tokens + self.generated_tokens) / self.seconds if self.seconds else 0.0
        waste = self.padded_tokens / self.real_tokens if self.real_tokens else 1.0
        lines = [
            *self.notes,
            f"shards: {self.done} done ({self.skipped} already committed), {self.failed} failed, of {self.shards}",
            f"rows: {self.rows} processed, {self.errors} with errors, {self.truncated} truncated",
            f"throughput: {rate:.1f} rows/s, {tokens:.0f} tokens/s, padding waste {waste:.3f} "
            f"(startup {self.startup_seconds:.1f} s, processing {self.seconds:.1f} s)",
        ]
        if self.startup_parts:
            lines.append("startup: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.startup_parts.items()))
        lines += [f"failed: {shard}: {reason}" for shard, reason in self.failures.items()]
        if self.lost:
            lines.append(f"stopped: {self.lost}; what this run committed is kept")
        if self.interrupted:
            lines.append("interrupted: rerun the same command to resume")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What must not pass unnoticed in a run that otherwise succeeded."""
        if self.nonfinite:
            return [f"WARNING: {self.nonfinite} of {self.rows} rows got non-finite scores from the model (NaN or "
                    "inf): their `error` says so. The checkpoint is likely corrupt or the dtype overflows."]
        return []


def _listed(names: list[str], line: Callable[[str], str]) -> list[str]:
    shown = [line(n) for n in names[:LISTED]]
    return shown + ([f"... and {len(names) - LISTED} more"] if len(names) > LISTED else [])


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
        self.rows = max(self.rows, rows)
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
        filled = min(width, int(width * self.rows / self.total_rows)) if self.total_rows else width
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
        self.sum = 0

    def add(self, key: str, rows: int) -> None:
        self.rows[key] = self.rows.get(key, 0) + rows
        self.sum += rows

    def reset(self, key: str) -> None:
        self.sum -= self.rows.pop(key, 0)  # a failed attempt's rows will be processed again

    def total(self) -> int:
        return self.sum


def reporter(counter):
    """A picklable report(key, rows) for the workers that feeds the counter actor without waiting; a dead
    counter only costs the live row count."""
    def report(key: str, rows: int) -> None:
        try:
            counter.add.remote(key, rows)
        except Exception:
            pass
    return report


def connect(address: str | None) -> None:
    """Start Ray here (address None) or join a cluster."""
    if ray.is_initialized():
        return
    use_token_auth(address)
    refresh_ray_config()
    if address is None:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        return
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as exc:
        hint = "" if token_available() else (
            " (clusters started with `ray start` use token authentication: set RAY_AUTH_TOKEN to the head "
            "node's token, or copy its ~/.ray/auth_token here)")
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {exc}{hint}") from exc


def actor_layout(spec: JobSpec) -> tuple[int, dict[str, Any], str, int | None]:
    """(actors, Ray resource options, device, torch threads) from the cluster's resources and the spec."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), int(resources.get("CPU", 1))
    r = spec.runner
    if gpus >= 1 and r.gpus_per_actor > 0:
        actors = r.actors or max(1, int(gpus // r.gpus_per_actor))
        if actors * r.gpus_per_actor > gpus:  # the rest would wait for GPUs forever
            raise RuntimeError(f"{actors} actors x {r.gpus_per_actor} GPUs each need {actors * r.gpus_per_actor:g} "
                               f"GPUs; the cluster has {gpus:g}: lower --actors or --gpus-per-actor")
        return actors, {"num_gpus": r.gpus_per_actor, "num_cpus": 1}, "cuda", None
    actors = r.actors or max(1, cpus // CPU_THREADS_PER_ACTOR)
    # more actors than CPUs share them (fractional CPUs) rather than wait for CPUs that never come
    return actors, {"num_cpus": min(cpus / actors, max(1, cpus // actors))}, "cpu", max(1, cpus // actors)


_received: list[int] = []  # the stopping signals received (Ray may re-raise ours as a plain KeyboardInterrupt)


def signal_of(exc: BaseException) -> int:
    return getattr(exc, "signum", None) or (_received[-1] if _received else signal.SIGINT)


def _stop_on_sigterm() -> None:
    """SIGTERM stops a run like Ctrl-C. Ray installs a handler of its own when it starts, so this is
    (re)installed after it; only the main thread can."""
    def handler(signum, frame):
        _received.append(signum)
        raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _output_columns(spec: JobSpec, config) -> list[str]:
    from pipelines.schema import added_columns, task_schema

    return added_columns(task_schema(spec.task, config, spec.wants_lm and spec.task == "classify")).names


def _check_output(spec: JobSpec, out_fs, out_base: str, overlap: str | None) -> None:
    """An output that would overwrite the input, or that cannot be a directory we write to: say so now."""
    import pyarrow.fs as pafs

    if overlap:
        raise ValueError(overlap)
    if out_fs.get_file_info(out_base).type == pafs.FileType.File:
        raise ValueError(f"output {spec.output} is a file, not a directory")
    try:
        out_fs.create_dir(out_base, recursive=True)
    except OSError as exc:
        raise ValueError(f"cannot write to output {spec.output}: {exc}") from None


def run_job(spec: JobSpec, stream=None, tty: bool | None = None,
            on_commit: Callable[[str], None] | None = None) -> JobResult:
    """Run a job to the end (or Ctrl-C / SIGTERM); returns its counts. Raises ValueError /
    FileNotFoundError / JobConflict / OutputBusy / ConnectionError before any work when the spec, input,
    output or cluster are wrong, or another run holds the output."""
    spec.validate()
    _stop_on_sigterm()
    started = time.perf_counter()
    from persimmon.files import load_dtype
    from persimmon.config import PersimmonConfig

    out_fs, out_base = resolve(spec.output)
    discovery = discover(spec.input, output=(out_fs, out_base))
    check_text_column(spec, discovery)
    _check_output(spec, out_fs, out_base, output_overlap(discovery, out_fs, out_base))
    checksum = model_checksum(spec.model)
    config = PersimmonConfig.from_pretrained(spec.model)
    fingerprint = spec.fingerprint(checksum, load_dtype(spec.model, spec.options.dtype), config)
    lease = OutputLease(out_fs, out_base, spec.output, ttl=spec.runner.lease_ttl)
    try:
        takeover = lease.acquire()
    except OSError as exc:
        raise ValueError(f"cannot write to output {spec.output}: {exc}") from None
    try:
        lease.start_heartbeat()
        manifest = Manifest.load(out_fs, out_base)
        if manifest is not None and manifest.data.get("fingerprint") != fingerprint and not spec.overwrite:
            raise JobConflict(
                f"{spec.output} holds results of another model or options (fingerprint "
                f"{manifest.data.get('fingerprint')}, this job {fingerprint}); use --overwrite to replace them, "
                "or another output directory")
        if manifest is None:
            manifest = Manifest(out_fs, out_base, {"shards": {}})
        elif manifest.data.get("fingerprint") != fingerprint:  # overwrite: the old results are replaced
            manifest.data["shards"] = {s: {**e, "state": "pending"} for s, e in manifest.shards.items()}
        manifest.data.update(
            fingerprint=fingerprint, model={"path": str(Path(spec.model).resolve()), "checksum": checksum},
            spec=spec.to_dict(), package_version=__version__, input=absolute(spec.input), output=absolute(spec.output),
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), lease=lease.holder.describe(),
        )
        plan = plan_run(spec, discovery, manifest, out_fs, out_base, fingerprint, _output_columns(spec, config))
        remove_temporaries(out_fs, out_base)  # every earlier run's: this run owns the output now
        manifest.clear_success()
        manifest.save()
        result = _result_of(plan, len(discovery.shards), discovery.skipped, takeover)
        if not plan.units:
            result.startup_seconds = time.perf_counter() - started
            _finish(manifest, result, len(discovery.shards))
            return result
        embedded = spec.runner.address is None and not ray.is_initialized()
        result.startup_parts["plan"] = time.perf_counter() - started  # discovery, model checksum, lease, manifest
        try:
            connect(spec.runner.address)
            result.startup_parts["ray"] = time.perf_counter() - started - result.startup_parts["plan"]
            _stop_on_sigterm()
            return JobRun(spec, fingerprint, manifest, lease, discovery, out_fs, out_base, result, started,
                          stream, tty, on_commit).run(plan.units)
        except SystemExit as exc:  # Ray's own SIGTERM handler, while ray.init runs, exits with the signal
            if exc.code in (signal.SIGTERM, signal.SIGINT):
                _received.append(exc.code)
                raise Interrupted(exc.code) from None
            raise
        finally:
            if embedded:  # Ray was started here (even if its start was cut short)
                ray.shutdown()
    finally:
        # the owner removes every run's temporaries (an actor of a killed run may have written after this run
        # started); a run that lost the output removes only its own
        remove_temporaries(out_fs, out_base, lease.holder.run_id if lease.lost else None)
        lease.release()


def _result_of(plan: Plan, shards: int, skipped_files: int, takeover: str | None) -> JobResult:
    result = JobResult(shards=shards, skipped=len(plan.done) + len(plan.adopted))
    result.done = result.skipped
    result.notes = [takeover] if takeover else []
    if skipped_files:
        result.notes.append(f"input: {skipped_files} files skipped (hidden, _-prefixed or not .parquet)")
    result.notes += _listed(plan.changed, lambda s: f"{s} changed since its output was committed: reprocessed")
    result.notes += _listed(plan.removed, lambda s: f"{s} is no longer in the input; its output is kept "
                                                    "(--overwrite removes it)")
    result.notes += _listed(plan.deleted, lambda s: f"removed the output of {s} (its input is gone)")
    for shard, reason in plan.rejected.items():
        result.failed += 1
        result.failures[shard] = reason
    return result


def _finish(manifest: Manifest, result: JobResult, shards: int) -> None:
    """Write the manifest whole (with the journal folded in) and `_SUCCESS` when every shard is committed."""
    counts = manifest.counts()
    manifest.data["summary"] = {**counts, "rows": result.rows, "errors": result.errors,
                                "truncated": result.truncated, "nonfinite": result.nonfinite,
                                "seconds": round(result.seconds, 3),
                                "startup_seconds": round(result.startup_seconds, 3),
                                "startup_parts": {k: round(v, 3) for k, v in result.startup_parts.items()}}
    manifest.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.save()
    if result.done == shards and not result.failed:
        manifest.mark_success()


@dataclass
class MergeTask:
    """Concatenate a sliced shard's finished parts into its one output file."""

    shard: str
    temps: list[str]
    stats: dict[str, Any]


class JobRun:
    """The dispatch loop of one run: a state machine over work units, merges and actors."""

    def __init__(self, spec: JobSpec, fingerprint: str, manifest: Manifest, lease: OutputLease, discovery,
                 out_fs, out_base: str, result: JobResult, started: float, stream, tty, on_commit) -> None:
        self.spec, self.fingerprint, self.manifest, self.lease = spec, fingerprint, manifest, lease
        self.discovery, self.out_fs, self.out_base = discovery, out_fs, out_base
        self.result, self.started, self.on_commit = result, started, on_commit
        self.stream, self.tty = stream, tty
        self.attempts: collections.Counter[str] = collections.Counter()
        self.parts: dict[str, dict[int, UnitResult]] = collections.defaultdict(dict)
        self.failed_shards: set[str] = set()
        self.queue: collections.deque[WorkUnit | MergeTask] = collections.deque()
        self.inflight: dict[Any, tuple[Any, WorkUnit | MergeTask]] = {}
        self.actors: list[Any] = []
        self.counter = None
        self.counted = 0.0  # when the counter was last asked

    def run(self, units: list[WorkUnit]) -> JobResult:
        count, resources, device, threads = actor_layout(self.spec)
        self.remote = ray.remote(ShardWorker).options(max_restarts=0, scheduling_strategy="SPREAD", **resources)
        self.worker_args = (self.spec, self.fingerprint, self.lease.holder.run_id, self.discovery.fs,
                            self.discovery.base, self.out_fs, self.out_base, device, threads)
        try:
            self.counter = ray.remote(RowCounter).options(num_cpus=0).remote()
        except Exception:
            self.counter = None
        idle = [self._new_actor() for _ in range(min(count, len(units)))]
        try:
            ray.get([a.pid.remote() for a in idle])  # models loaded: what follows is processing time
        except ray.exceptions.RayActorError as exc:
            cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
            last = str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause)
            raise RuntimeError(f"the workers could not load the model: {last}") from None
        self.result.startup_seconds = time.perf_counter() - self.started
        self.result.startup_parts["workers"] = self.result.startup_seconds - sum(self.result.startup_parts.values())
        processing = time.perf_counter()
        self.queue.extend(units)
        self.progress = Progress(sum(u.rows for u in units), self.result.shards - self.result.skipped,
                                 self.stream, self.tty)
        try:
            self._loop(idle)
        except KeyboardInterrupt as exc:
            self.result.interrupted = signal_of(exc)
            self._kill_actors()  # stops their units mid-way; the temporaries are removed by run_job
        except LeaseLost as exc:
            self.result.lost = str(exc)
            self._kill_actors()
        except ray.exceptions.RayError as exc:
            self._kill_actors()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"Ray failed during the job ({type(exc).__name__}: {first}); what is committed "
                               "is kept: rerun the same command to resume") from None
        finally:
            self.progress.close()
            self.result.seconds = time.perf_counter() - processing
            if not self.result.lost:  # the output is another run's now: its manifest is not ours to write
                _finish(self.manifest, self.result, self.result.shards)
        return self.result

    def _new_actor(self):
        actor = self.remote.remote(*self.worker_args, reporter(self.counter) if self.counter else None)
        self.actors.append(actor)
        return actor

    def _kill_actors(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass

    def _loop(self, idle: list[Any]) -> None:
        while self.queue or self.inflight:
            while idle and self.queue:
                task = self.queue.popleft()
                if task.shard in self.failed_shards:
                    continue
                actor = idle.pop()
                if isinstance(task, MergeTask):
                    ref = actor.merge.remote(task.shard, task.temps)
                else:
                    ref = actor.process.remote(task)
                self.inflight[ref] = (actor, task)
            if not self.inflight:
                break
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            self._show_progress()
            for ref in ready:
                actor, task = self.inflight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # killed, out of memory: a fresh actor redoes it
                    outcome = UnitResult(False, error=f"actor died: {type(exc).__name__}: {str(exc)[:300]}")
                    actor = self._new_actor()
                except ray.exceptions.RayTaskError as exc:
                    outcome = UnitResult(False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                idle.append(actor)
                self._handle(task, outcome)

    def _show_progress(self) -> None:
        """Live rows from the counter actor, at most twice a second; without it, rows of committed shards."""
        now = time.perf_counter()
        if self.counter is not None and now - self.counted > 0.5:
            self.counted = now
            try:
                self.progress.update(ray.get(self.counter.total.remote(), timeout=2))
            except (ray.exceptions.RayError, TimeoutError):
                self.counter = None
        self.progress.update(self.result.rows)

    def _handle(self, task: WorkUnit | MergeTask, outcome: UnitResult) -> None:
        key = task.shard if isinstance(task, MergeTask) else task.key
        if not outcome.ok:
            if self.counter is not None and isinstance(task, WorkUnit):
                try:
                    self.counter.reset.remote(key)
                except Exception:
                    pass
            self.attempts[key] += 1
            if not outcome.permanent and self.attempts[key] < self.spec.runner.max_attempts:
                self.queue.append(task)
            elif task.shard not in self.failed_shards:
                self._failed(task.shard, outcome.error or "failed", self.attempts[key])
            return
        if isinstance(task, MergeTask):
            self._done(task.shard, outcome.temp, task.stats)
            return
        if task.parts == 1:
            self._done(task.shard, outcome.temp, outcome.stats, task.identity)
            return
        finished = self.parts[task.shard]
        finished[task.part] = outcome
        if len(finished) == task.parts:  # all slices in: one actor concatenates them, in order
            slices = [finished[i] for i in range(task.parts)]
            del self.parts[task.shard]
            merged = {k: sum(s.stats.get(k, 0) for s in slices) for k in (*UNIT_COUNTS, "seconds")}
            merged.update(node=",".join(sorted({s.stats["node"] for s in slices})), parts=task.parts,
                          input_identity=task.identity)
            self.queue.appendleft(MergeTask(task.shard, [s.temp for s in slices], merged))

    def _done(self, shard: str, temp: str, stats: dict[str, Any], identity: dict | None = None) -> None:
        if self.lease.lost:  # another run owns the output now: commit nothing more
            raise LeaseLost(self.lease.lost)
        final = output_name(shard)
        commit(self.out_fs, self.out_base, temp, final)
        entry = {"output": final, "attempts": self.attempts[shard] + 1, **stats}
        if identity is not None:
            entry["input_identity"] = identity
        self.manifest.mark_done(shard, entry)
        self.result.done += 1
        for key in UNIT_COUNTS:
            setattr(self.result, key, getattr(self.result, key) + stats.get(key, 0))
        self.progress.shard_done(shard, {**entry, "errors": stats.get("errors", 0)})
        if self.on_commit is not None:
            self.on_commit(shard)

    def _failed(self, shard: str, reason: str, attempts: int) -> None:
        self.failed_shards.add(shard)
        self.manifest.mark_failed(shard, output_name(shard), reason, attempts)
        self.result.failed += 1
        self.result.failures[shard] = reason
        self.progress.shard_failed(shard, reason)


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
