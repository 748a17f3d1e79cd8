"""run_job: one run of a job from its checks to its verified end.

1. Before anything is written: the spec, the input (discovered by identity), the output (not a system folder,
   not inside the input or another job's output, holding nothing of anyone else's), the model (checksum and
   pin of its files).
2. The output's lease (one owner per output, for every command); under it, the manifest is read again, the
   ownership checked again, and the run planned (jobs/planning/plan.py).
3. Ray is started here or joined (execution/cluster.py); only then is the manifest written (a run refused by
   the cluster leaves nothing behind in an output it created).
4. The dispatcher (policy) and the pool (Ray) process the units; each finished unit is committed (atomic
   rename) and journaled, with the lease confirmed first.
5. Before `_SUCCESS`: one listing of the output; a committed file that is gone or changed is redone once, and
   named as failed if it goes again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import ray

from persimmon import __version__
from pipelines.errors import one_line

from .errors import (BatchError, ClusterFailed, JobConflict, JobFailed, LeaseLost, ModelChanged, OutputBusy,
                     ShardState, UsageError, write_error)
from .execution import cluster
from .execution.cluster import joined
from .execution.dispatcher import UNIT_COUNTS, Commit, Discard, Dispatcher, Failure, Fatal
from .execution.layout import actor_layout, cluster_capacity
from .execution.pool import Pool
from .execution.progress import Progress
from .execution.results import JobResult, result_of
from .execution.signals import StopSignals, signal_of
from .execution.submit import AlreadySubmitted, follow_job, submission_id, submit_job
from .inputs.discovery import ShardInfo, inspect_shard
from .inputs.formats import REQUESTS, Format
from .output.sinks import companions, request_counts
from .output.commit import commit, remove_file, remove_temporaries
from .output.paths import absolute, join
from .output.lease import OutputLease
from .output.manifest import Manifest
from .planning.plan import Plan, missing_outputs, plan_run
from .planning.resolve import ResolvedJob, output_columns, read_manifest, resolve_job
from .planning.units import plan_units, units_for_actors
from .spec import JobSpec

__all__ = ["AlreadySubmitted", "JobConflict", "JobResult", "OutputBusy", "follow_job", "run_job", "signal_of",
           "submission_id", "submit_job"]


class Held:
    """The output's lease for the span of a run, and whether the run has written into the output yet."""

    def __init__(self, lease: OutputLease, takeover: str | None) -> None:
        self.lease, self.takeover, self.written = lease, takeover, False


@contextmanager
def held_output(job: ResolvedJob, signals: StopSignals) -> Iterator[Held]:
    """The output's lease (one owner per output). At the end the temporaries are removed (the owner removes
    every run's, as an actor of a killed run may have written after this run started; a run that lost the
    output removes only its own) and the lease released; a run that wrote nothing leaves no trace."""
    spec = job.spec
    lease = OutputLease(job.out_fs, job.out_base, spec.output, ttl=spec.runner.lease_ttl, command=spec.task)
    try:
        takeover = lease.acquire()
    except OSError as exc:
        raise UsageError(f"cannot write to output {spec.output}: {exc.strerror or exc}") from None
    lease.start_heartbeat()
    held = Held(lease, takeover)
    try:
        yield held
    finally:
        signals.cleanup()
        if held.written:
            remove_temporaries(job.out_fs, job.out_base, lease.holder.run_id if lease.lost else None)
        lease.release(discard=not held.written)


def run_job(job: JobSpec | ResolvedJob, stream=None, tty: bool | None = None,
            on_commit: Callable[[str], None] | None = None) -> JobResult:
    """Run a job to the end (or Ctrl-C / SIGTERM); returns its counts. Raises a BatchError (UsageError,
    JobConflict, ForeignOutput, OutputBusy ...) before any work when the spec, input, output or cluster are
    wrong, or another run holds the output; ClusterFailed / JobFailed (with `.result`) when the run ends
    under way; Interrupted (with `.result`) when stopped. `job` as resolve_job returns it is not checked again.
    """
    with StopSignals() as signals:
        started = time.perf_counter()
        if isinstance(job, ResolvedJob):
            started -= job.seconds  # resolved before: its checks count as this run's start-up
        else:
            job = resolve_job(job)
        spec = job.spec
        with held_output(job, signals) as held:
            manifest, plan = _planned(job)  # under the lease
            result = signals.result = result_of(spec.input_format, plan, job.discovery, held.takeover)
            result.startup_parts["plan"] = time.perf_counter() - started  # discovery, checksum, lease, manifest
            with joined(spec.runner.address, bool(plan.pending), signals):
                if plan.pending:
                    result.startup_parts["ray"] = time.perf_counter() - started - result.startup_parts["plan"]
                held.written = True
                _open_manifest(job, manifest, plan, held.lease)
                if not plan.pending:
                    result.startup_seconds = time.perf_counter() - started
                    _finish(manifest, result, spec, held.lease)
                    return result
                return JobRun(job, manifest, held.lease, result, started, stream, tty, on_commit).run(plan.pending)


def _planned(job: ResolvedJob) -> tuple[Manifest, Plan]:
    """Step 2: the manifest read again and ownership checked again, now under the lease; results of another
    fingerprint refused (or, with --overwrite, marked to be redone); then the run planned."""
    spec, fingerprint = job.spec, job.fingerprint
    manifest, listing, recognised = read_manifest(job.out_fs, job.out_base, job.discovery, spec)
    if manifest is not None and manifest.data.get("fingerprint") != fingerprint and not spec.overwrite:
        raise JobConflict(
            f"{spec.output} holds results of another model or options (fingerprint "
            f"{manifest.data.get('fingerprint')}, this job {fingerprint}); use --overwrite to replace them, "
            "or another output directory")
    if manifest is None:
        manifest = Manifest(job.out_fs, job.out_base, {"shards": {}})
    elif manifest.data.get("fingerprint") != fingerprint:  # overwrite: the old results are replaced
        manifest.data["shards"] = {s: {**e, "state": ShardState.PENDING.value} for s, e in manifest.shards.items()}
    plan = plan_run(spec, job.discovery, manifest, listing, recognised, fingerprint,
                    output_columns(spec, job.config))
    return manifest, plan


def _open_manifest(job: ResolvedJob, manifest: Manifest, plan: Plan, lease: OutputLease) -> None:
    """Step 3, once Ray is up: the manifest names this run, what the plan deletes is deleted, every earlier
    run's temporaries removed (this run owns the output now) and `_SUCCESS` cleared."""
    spec, out_fs, out_base = job.spec, job.out_fs, job.out_base
    try:
        manifest.data.update(
            fingerprint=job.fingerprint, model={"path": str(Path(spec.model).resolve()),
                                                   "checksum": job.checksum, "files": job.pin["files"]},
            spec=spec.to_dict(), package_version=__version__, input=absolute(spec.input),
            output=absolute(spec.output), started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            lease=lease.holder.describe())
        manifest.add_run(lease.holder.run_id)
        for shard, output in plan.delete.items():
            out_fs.delete_file(join(out_base, output))
        remove_temporaries(out_fs, out_base)
        manifest.clear_success()
        manifest.save()
    except OSError as exc:
        raise write_error(exc, spec.output) from None


def _finish(manifest: Manifest, result: JobResult, spec: JobSpec, lease: OutputLease) -> None:
    """Write the manifest whole (with the journal folded in) and `_SUCCESS` when every shard is committed
    (and, for a run that did work, found on disk: JobRun checks that before), each while the lease is still
    this run's (LeaseLost otherwise)."""
    counts = manifest.counts()
    done = [e for e in manifest.shards.values() if e.get("state") == ShardState.DONE.value]
    totals = {key: sum(e.get(key, 0) or 0 for e in done) for key in ("rows", "errors", "truncated", "nonfinite")}
    # the job's totals over every committed shard (a no-op rerun leaves them as they were); `run`: this run's own
    manifest.data["summary"] = {**counts, **totals,
                                "run": {"rows": result.rows, "errors": result.errors, "truncated": result.truncated,
                                        "nonfinite": result.nonfinite, "shards": result.done - result.skipped},
                                "seconds": round(result.seconds, 3),
                                "startup_seconds": round(result.startup_seconds, 3),
                                "startup_parts": {k: round(v, 3) for k, v in result.startup_parts.items()},
                                "backups": result.backups}
    if spec.input_format == REQUESTS:  # OpenAI's batch object counts requests, over the whole job
        manifest.data["summary"]["request_counts"] = request_counts(totals)
    manifest.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    complete = result.done == result.shards and not result.failed and not result.interrupted and not result.lost
    if spec.compare_with and complete:
        _drift(manifest, result, spec)
    try:
        lease.confirm(force=True)
        manifest.save()
        if result.done == result.shards and not result.failed and not result.interrupted and not result.lost:
            lease.confirm(force=True)
            manifest.mark_success()
    except OSError as exc:
        raise write_error(exc, spec.output) from None


def _drift(manifest: Manifest, result: JobResult, spec: JobSpec) -> None:
    """A complete run of a job file's date: its results against the previous date's, recorded in the manifest
    (`drift`), and one WARNING line when a measure passes the job's threshold. A comparison that cannot be made
    is a note; the run's own outcome does not depend on it."""
    from .report import collect, compare

    try:
        drift = compare(collect(spec.compare_with), collect(spec.output, manifest), spec.drift_threshold)
    except Exception as exc:  # the previous output unreadable, say: this run is still complete
        result.notes.append(f"drift from {spec.compare_with} not measured: {one_line(exc, with_type=True)}")
        return
    manifest.data["drift"] = {"compared_with": spec.compare_with, **drift.as_dict()}
    result.drift = drift.warning(spec.compare_with)


class JobRun:
    """The dispatch loop of one run: the dispatcher decides, the pool runs, this executes the decisions."""

    def __init__(self, job: ResolvedJob, manifest: Manifest, lease: OutputLease, result: JobResult, started: float,
                 stream, tty, on_commit) -> None:
        self.job, self.spec, self.manifest, self.lease = job, job.spec, manifest, lease
        self.discovery, self.out_fs, self.out_base = job.discovery, job.out_fs, job.out_base
        self.result, self.started, self.on_commit = result, started, on_commit
        self.stream, self.tty = stream, tty

    def run(self, shards: list[tuple[str, ShardInfo]]) -> JobResult:
        r = self.spec.runner
        capacity = cluster_capacity(self.spec)
        units = units_for_actors(shards, capacity[0], r.rows_per_unit, r.batch_rows)
        layout = actor_layout(self.spec, capacity, len(units))
        self.result.layout = layout.describe()
        self.manifest.data["layout"] = layout.as_dict()
        self.dispatcher = Dispatcher(units, r.max_attempts, r.stall_timeout, r.placement_timeout,
                                     backup_tasks=layout.backup_tasks, target=layout.actors,
                                     needs=str(layout.resources))
        self.progress = Progress(sum(u.rows for u in units), self.result.shards - self.result.skipped,
                                 self.stream, self.tty)
        self.progress.note(self.result.layout)
        worker_args = (self.spec, self.job.fingerprint, self.lease.holder.run_id, self.job.pin, self.discovery.fs,
                       self.discovery.base, self.out_fs, self.out_base, layout.device, layout.threads)
        self.pool = Pool(self.dispatcher, worker_args, layout.resources, self.progress.note)
        self.processing = None
        failure: BaseException | None = None
        try:
            self.pool.request(self.dispatcher.to_request())
            self._loop()
            if not self.dispatcher.stopped:
                self._verify()
        except KeyboardInterrupt as exc:
            self.result.interrupted = signal_of(exc)
        except LeaseLost as exc:
            self.result.lost = str(exc)
        except ClusterFailed as exc:
            if self.pool.abandoned:  # the cluster itself is gone (not: no actor could be placed on it)
                cluster.gone.append(str(exc))
            failure = exc
        except OSError as exc:  # a commit or a journal record failed: gone under us, or the disk
            try:
                self.lease.confirm(force=True)
                failure = write_error(exc, self.spec.output)
            except (LeaseLost, OSError):
                failure = None  # the output is not ours any more: said as lost below
                self.result.lost = self.lease.lost or "the output's lease could not be confirmed"
        except BatchError as exc:
            failure = exc
        except ray.exceptions.RayError as exc:
            failure = JobFailed(f"Ray failed during the job ({one_line(exc, first=True, with_type=True)}); what is "
                                "committed is kept: rerun the same command to resume")
        finally:
            self.result.backups = dict(self.dispatcher.backups)
            self.pool.kill_all()  # stops their units mid-way; held_output removes the temporaries
            self.progress.close()
            self.result.seconds = time.perf_counter() - self.processing if self.processing else 0.0
        if self.lease.lost and not self.result.lost:
            self.result.lost = self.lease.lost
        fatal = self.dispatcher.fatal
        if fatal is not None and failure is None:
            if fatal.fatal == Fatal.MODEL_CHANGED:
                failure = ModelChanged(fatal.error)
            else:
                failure = JobFailed(f"cannot write to output {self.spec.output}: {fatal.error}; what is committed "
                                    "is kept: rerun the same command to resume")
        if not self.result.lost:  # the output is another run's now: its manifest is not ours to write
            try:
                _finish(self.manifest, self.result, self.spec, self.lease)
            except LeaseLost as exc:
                self.result.lost = str(exc)
            except JobFailed as exc:
                failure = failure or exc
        if failure is not None:
            failure.result = self.result  # the CLI prints the summary, then the error line
            raise failure
        return self.result

    def _loop(self) -> None:
        while not self.dispatcher.finished:
            if self.lease.lost:
                raise LeaseLost(self.lease.lost)
            decisions = self.pool.step()
            if self.processing is None and self.pool.loaded_once.is_set():
                self.processing = time.perf_counter()
                self.result.startup_seconds = self.processing - self.started
                self.result.startup_parts["workers"] = self.result.startup_seconds - sum(
                    self.result.startup_parts.values())
            for decision in decisions:
                if isinstance(decision, Commit):
                    self._done(decision)
                elif isinstance(decision, Discard):
                    self._discard(decision.temp)
                else:
                    self._failed(decision)
            self.progress.update(self.result.rows + self.dispatcher.rows_in_flight())

    def _verify(self) -> None:
        """Every shard the manifest calls done is on disk as committed: what is gone is redone, once."""
        self.lease.confirm(force=True)  # a folder moved away is not this run's output any more
        for round in range(2):
            missing = missing_outputs(self.out_fs, self.out_base, self.manifest)
            if not missing:
                return
            for shard, why in missing.items():
                entry = self.manifest.shards[shard]
                if round == 1:
                    reason = f"{why} (gone again after it was redone: something is removing this run's outputs)"
                    self._failed(Failure(shard, reason, entry.get("attempts", 1)))
                    continue
                self.progress.note(f"{why}: redone")
                self.result.notes.append(f"{why}: redone")
                self.result.done -= 1
                for key in UNIT_COUNTS:
                    setattr(self.result, key, getattr(self.result, key) - entry.get(key, 0))
                info = inspect_shard(self.discovery.fs, self.discovery.base, shard, self.discovery.files.get(shard),
                                     self.spec.text_column, self.discovery.format_of(shard), self.spec.csv_delimiter)
                self.manifest.mark_pending(shard, entry.get("output", self.discovery.output(shard)), info.identity,
                                           "its committed output was gone before the run ended")
                self.dispatcher.add(plan_units(shard, info, self.spec.runner.rows_per_unit))
            if round == 1:
                return
            self._loop()

    def _done(self, decision: Commit) -> None:
        self.lease.confirm()  # raises LeaseLost: another run owns the output now, commit nothing more
        final = self.discovery.output(decision.shard)
        fmt = self.discovery.format_of(decision.shard)
        entry = {"output": final, "attempts": decision.attempts, **decision.stats,
                 "committed_at": round(time.time(), 3)}  # the driver's clock: the report's timeline
        entry.pop("input_identity", None)
        if decision.identity is not None:
            entry["input_identity"] = decision.identity
        temps, finals = companions(decision.temp, fmt), companions(final, fmt)
        if len(finals) > 1:  # files without metadata: journal the commit before moving them (manifest.py)
            sizes = [self.out_fs.get_file_info(join(self.out_base, t)).size for t in temps]
            self.manifest.mark_committing(decision.shard, {**entry, "size": sizes[0], "companions": {
                name: {"size": size} for name, size in zip(finals[1:], sizes[1:])}})
            # an earlier commit's main file goes first: a kill between the moves below then leaves no main file
            # (an unfinished commit, redone) rather than the old results beside the new errors
            remove_file(self.out_fs, self.out_base, final)
        for temp, name in reversed(list(zip(temps, finals))):  # the main file last: its presence means all are
            committed = commit(self.out_fs, self.out_base, temp, name)
            if name == final:
                entry.update(committed)
            else:
                entry.setdefault("companions", {})[name] = committed
        self.manifest.mark_done(decision.shard, entry)
        self.result.done += 1
        for key in UNIT_COUNTS:
            setattr(self.result, key, getattr(self.result, key) + decision.stats.get(key, 0))
        self.progress.shard_done(decision.shard, entry)
        if self.on_commit is not None:
            self.on_commit(decision.shard)

    def _discard(self, temp: str) -> None:
        """A backup's twin finished too: its file is nobody's (the end of the run would remove it anyway)."""
        for name in companions(temp, REQUESTS if temp.endswith(".jsonl") else Format.PARQUET):
            try:
                self.out_fs.delete_file(join(self.out_base, name))
            except OSError:
                pass

    def _failed(self, decision: Failure) -> None:
        self.manifest.mark_failed(decision.shard, self.discovery.output(decision.shard), decision.reason,
                                  decision.attempts)
        self.result.failed += 1
        self.result.failures[decision.shard] = decision.reason
        self.progress.shard_failed(decision.shard, decision.reason)
