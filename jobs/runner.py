"""run_job: one run of a job from its checks to its verified end. The only module that starts or joins Ray.

1. Before anything is written: the spec, the input (discovered by identity), the output (not a system folder,
   not inside the input or another job's output, holding nothing of anyone else's), the model (checksum and
   pin of its files).
2. The output's lease (one owner per output, for every command); under it, the manifest is read again, the
   ownership checked again, and the run planned (jobs/output/plan.py).
3. Ray is started here or joined; only then is the manifest written (a run refused by the cluster leaves
   nothing behind in an output it created).
4. The dispatcher (policy) and the pool (Ray) process the units; each finished unit is committed (atomic
   rename) and journaled, with the lease confirmed first.
5. Before `_SUCCESS`: one listing of the output; a committed file that is gone or changed is redone once, and
   named as failed if it goes again.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from persimmon import __version__

from .errors import (EXIT_BUSY, EXIT_FAILED, EXIT_OK, BatchError, ClusterFailed, Interrupted, JobConflict, JobFailed,
                     LeaseLost, ModelChanged, OutputBusy, ShardState, UsageError, write_error)
from .execution.cluster_auth import refresh_ray_config, token_available, use_token_auth
from .execution.dispatcher import UNIT_COUNTS, Commit, Discard, Dispatcher, Failure, Fatal
from .execution.pool import Pool
from .execution.progress import Progress
from .execution.submit import AlreadySubmitted, follow_job, submission_id, submit_job
from .output.checksum import model_checksum, pin_model
from .output import formats
from .output.commit import commit, remove_file, remove_temporaries
from .output.discovery import Discovery, ShardInfo, absolute, discover, inspect_shard, join, output_overlap, resolve
from .output.lease import OutputLease
from .output.manifest import Manifest
from .output.ownership import enclosing_job, system_folder
from .output.plan import (Plan, check_ownership, check_text_column, list_output, missing_outputs, plan_run,
                          plan_units, size_for_pool)
from .spec import JobSpec

CPU_THREADS_PER_ACTOR = 4  # default CPU actor size when the number of actors is not given
LISTED = 20  # shards named one by one in a summary section before "and N more"

__all__ = ["AlreadySubmitted", "JobConflict", "JobResult", "OutputBusy", "follow_job", "run_job", "signal_of",
           "submission_id", "submit_job"]


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
    layout: str = ""  # the actors started and what each holds (Layout.describe)
    backups: dict[str, int] = field(default_factory=dict)  # backup attempts started, and won (finished first)
    kept: list[str] = field(default_factory=list)  # outputs kept whose input is gone (every run says so)

    @property
    def left(self) -> int:
        """Shards neither committed nor failed at the end (0 for a run that went to its end)."""
        return max(0, self.shards - self.done - self.failed)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.left and not self.interrupted and not self.lost

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        if self.lost:
            return EXIT_BUSY
        return EXIT_OK if self.ok else EXIT_FAILED

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
        if self.layout:
            lines.append(self.layout)
        if self.backups.get("started"):
            lines.append(f"backups: {self.backups['started']} started for units far behind their peers, "
                         f"{self.backups['won']} finished first")
        lines += [f"failed: {shard}: {reason}" for shard, reason in self.failures.items()]
        if self.left and not self.interrupted and not self.lost:
            lines.append(f"incomplete: {self.left} shards neither committed nor failed; rerun the same command "
                         "to finish them")
        if self.lost:
            lines.append(f"stopped: {self.lost}; what this run committed is kept")
        if self.interrupted:
            lines.append("interrupted: rerun the same command to resume")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What must not pass unnoticed in a run that otherwise succeeded."""
        found = []
        if self.nonfinite:
            found.append(f"WARNING: {self.nonfinite} of {self.rows} rows got non-finite scores from the model (NaN "
                         "or inf): their `error` says so. The checkpoint is likely corrupt or the dtype overflows.")
        if self.kept:
            shown = ", ".join(self.kept[:LISTED]) + (f" and {len(self.kept) - LISTED} more" if len(self.kept) > LISTED else "")
            found.append(f"WARNING: the output still holds {len(self.kept)} file(s) whose input is gone ({shown}): "
                         "whatever reads the whole folder (pandas, duckdb, Spark) still reads their rows; rerun "
                         "with --overwrite to remove them")
        return found


def _listed(names: list[str], line: Callable[[str], str]) -> list[str]:
    shown = [line(n) for n in names[:LISTED]]
    return shown + ([f"... and {len(names) - LISTED} more"] if len(names) > LISTED else [])


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
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        return
    _reachable(address)
    try:
        ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, ray.exceptions.RayError) as exc:
        hint = "" if token_available() else (
            " (clusters started with `ray start` use token authentication: set RAY_AUTH_TOKEN to the head "
            "node's token, or copy its ~/.ray/auth_token here)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot join the Ray cluster at {address}: {first}{hint}") from None


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
        raise UsageError(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None
    if not bootstrap:
        raise UsageError(f"cannot join the Ray cluster at {address}: no running cluster found on this machine")
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot join the Ray cluster at {address}: nothing answers at {bootstrap} "
                         f"({getattr(exc, 'strerror', None) or exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Layout:
    """How a run's actors sit on the cluster: how many were started, with what each holds."""

    actors: int
    device: str  # "cuda" or "cpu"
    resources: dict[str, Any]  # Ray's resource options per actor
    threads: int | None  # torch threads per CPU actor
    requested: int  # the actors the cluster or --actors allowed (more than started when there are fewer units)
    units: int = 0
    backup_tasks: bool = False

    def describe(self) -> str:
        if self.device == "cuda":
            each = f"{self.resources['num_gpus']:g} GPU each"
        else:
            each = f"{self.threads} torch thread{'s' * (self.threads != 1)} on {self.resources['num_cpus']:.3g} CPUs each"
        fewer = f" (of {self.requested}: one per unit at most)" if self.actors < self.requested else ""
        return (f"layout: {self.actors} actor{'s' * (self.actors != 1)}{fewer}, {each}; {self.units} work "
                f"unit{'s' * (self.units != 1)}; backups {'on' if self.backup_tasks else 'off'}")

    def as_dict(self) -> dict[str, Any]:
        return {"actors": self.actors, "requested": self.requested, "device": self.device,
                "threads_per_actor": self.threads, "cpus_per_actor": self.resources.get("num_cpus"),
                "gpus_per_actor": self.resources.get("num_gpus", 0), "units": self.units,
                "backup_tasks": self.backup_tasks}


def pool_size(spec: JobSpec) -> tuple[int, str, int]:
    """(actors the job may use, device, the cluster's CPUs) from the cluster's resources and the spec."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), int(resources.get("CPU", 1))
    r = spec.runner
    if gpus >= 1 and r.gpus_per_actor > 0:
        actors = r.actors or max(1, int(gpus // r.gpus_per_actor))
        if actors * r.gpus_per_actor > gpus:  # the rest would wait for GPUs forever
            raise UsageError(f"{actors} actors x {r.gpus_per_actor} GPUs each need {actors * r.gpus_per_actor:g} "
                             f"GPUs; the cluster has {gpus:g}: lower --actors or --gpus-per-actor")
        return actors, "cuda", cpus
    return r.actors or max(1, cpus // CPU_THREADS_PER_ACTOR), "cpu", cpus


def actor_layout(spec: JobSpec, pool: tuple[int, str, int], units: int) -> Layout:
    """The layout for a job of `units` work units on a pool (pool_size): as many actors as may run, but no more
    than there are units; CPU actors share the cluster's CPUs between the actors started (threads follow them:
    one actor on 4 CPUs runs 4 threads, not the 1 it would get as one of 4 requested). Backups default to on
    for a cluster of several nodes (where one slow or throttled node holds a job), off on one machine."""
    requested, device, cpus = pool
    actors = max(1, min(requested, units))
    backups = spec.runner.backup_tasks
    if backups is None:
        backups = sum(1 for n in ray.nodes() if n.get("Alive")) > 1
    if device == "cuda":
        return Layout(actors, device, {"num_gpus": spec.runner.gpus_per_actor, "num_cpus": 1}, None, requested,
                      units, backups)
    # more actors than CPUs share them (fractional CPUs) rather than wait for CPUs that never come
    return Layout(actors, device, {"num_cpus": min(cpus / actors, max(1, cpus // actors))}, max(1, cpus // actors),
                  requested, units, backups)


_received: list[int] = []  # the stopping signals received (Ray may re-raise ours as a plain KeyboardInterrupt)
_cleaning = threading.Event()  # set while a run gives its output back: a signal then waits for the end of it


def signal_of(exc: BaseException) -> int:
    return getattr(exc, "signum", None) or (_received[-1] if _received else signal.SIGINT)


def _stop_on_sigterm() -> None:
    """SIGTERM stops a run like Ctrl-C. Ray installs a handler of its own when it starts, so this is
    (re)installed after it; only the main thread can."""
    def handler(signum, frame):
        _received.append(signum)
        if not _cleaning.is_set():
            raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _output_columns(spec: JobSpec, config) -> list[str]:
    from pipelines.schema import added_columns
    from pipelines.tasks import TASKS

    return added_columns(TASKS[spec.task].columns(config, spec.options)).names


def check_output_place(spec: JobSpec, out_fs, out_base: str, discovery: Discovery) -> None:
    """An output that is a system folder, a file, inside the input or inside another job's output: refused
    before anything is written."""
    import pyarrow.fs as pafs

    from .errors import ForeignOutput

    if out_fs.type_name == "local":
        why = system_folder(out_base)
        if why:
            raise ForeignOutput(why)
    overlap = output_overlap(discovery, out_fs, out_base)
    if overlap:
        raise UsageError(overlap)
    info = out_fs.get_file_info(out_base)
    if info.type == pafs.FileType.File:
        raise UsageError(f"output {spec.output} is a file, not a directory")
    enclosing = enclosing_job(out_fs, out_base)
    if enclosing:
        raise ForeignOutput(f"output {spec.output} is inside the output of another job ({enclosing}): its files "
                            "would become that job's foreign files; give a folder outside it")


def _read_manifest(out_fs, out_base: str, discovery: Discovery, spec: JobSpec):
    """(manifest or None, listing, recognised unrecorded files): the output's state, ownership checked."""
    listing = list_output(out_fs, out_base)
    manifest = Manifest.load(out_fs, out_base)
    recognised = check_ownership(spec.output, out_fs, out_base, listing, manifest, discovery)
    return manifest, listing, recognised


def run_job(spec: JobSpec, stream=None, tty: bool | None = None,
            on_commit: Callable[[str], None] | None = None) -> JobResult:
    """Run a job to the end (or Ctrl-C / SIGTERM); returns its counts. Raises a BatchError (UsageError,
    JobConflict, ForeignOutput, OutputBusy ...) before any work when the spec, input, output or cluster are
    wrong, or another run holds the output; ClusterFailed / JobFailed (with `.result`) when the run ends
    under way."""
    spec.validate()
    _stop_on_sigterm()
    signals_before = len(_received)  # one that comes while the run gives its output back is raised after it
    started = time.perf_counter()
    from persimmon.config import PersimmonConfig
    from persimmon.files import load_dtype

    out_fs, out_base = resolve(spec.output)
    discovery = discover(spec.input, output=(out_fs, out_base), input_format=spec.input_format)
    check_text_column(spec, discovery)
    check_output_place(spec, out_fs, out_base, discovery)
    _read_manifest(out_fs, out_base, discovery, spec)  # refuse someone else's folder before writing into it
    checksum = model_checksum(spec.model)
    pin = pin_model(spec.model, checksum)
    config = PersimmonConfig.from_pretrained(spec.model)
    fingerprint = spec.fingerprint(checksum, load_dtype(spec.model, spec.options.dtype), config)
    lease = OutputLease(out_fs, out_base, spec.output, ttl=spec.runner.lease_ttl, command=spec.task)
    try:
        takeover = lease.acquire()
    except OSError as exc:
        raise UsageError(f"cannot write to output {spec.output}: {exc.strerror or exc}") from None
    lease.start_heartbeat()
    written = False
    try:
        manifest, listing, recognised = _read_manifest(out_fs, out_base, discovery, spec)  # now under the lease
        if manifest is not None and manifest.data.get("fingerprint") != fingerprint and not spec.overwrite:
            raise JobConflict(
                f"{spec.output} holds results of another model or options (fingerprint "
                f"{manifest.data.get('fingerprint')}, this job {fingerprint}); use --overwrite to replace them, "
                "or another output directory")
        if manifest is None:
            manifest = Manifest(out_fs, out_base, {"shards": {}})
        elif manifest.data.get("fingerprint") != fingerprint:  # overwrite: the old results are replaced
            manifest.data["shards"] = {s: {**e, "state": ShardState.PENDING.value} for s, e in manifest.shards.items()}
        plan = plan_run(spec, discovery, manifest, listing, recognised, fingerprint, _output_columns(spec, config))
        result = _result_of(spec, plan, discovery, takeover)
        embedded = spec.runner.address is None and not ray.is_initialized()
        result.startup_parts["plan"] = time.perf_counter() - started  # discovery, model checksum, lease, manifest
        try:
            if plan.pending:
                connect(spec.runner.address)
                result.startup_parts["ray"] = time.perf_counter() - started - result.startup_parts["plan"]
                _stop_on_sigterm()
            written = True
            try:
                manifest.data.update(
                    fingerprint=fingerprint, model={"path": str(Path(spec.model).resolve()), "checksum": checksum,
                                                    "files": pin["files"]},
                    spec=spec.to_dict(), package_version=__version__, input=absolute(spec.input),
                    output=absolute(spec.output), started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    lease=lease.holder.describe())
                manifest.add_run(lease.holder.run_id)
                for shard, output in plan.delete.items():
                    out_fs.delete_file(join(out_base, output))
                remove_temporaries(out_fs, out_base)  # every earlier run's: this run owns the output now
                manifest.clear_success()
                manifest.save()
            except OSError as exc:
                raise write_error(exc, spec.output) from None
            if not plan.pending:
                result.startup_seconds = time.perf_counter() - started
                _finish(manifest, result, spec, lease)
                return result
            return JobRun(spec, fingerprint, pin, manifest, lease, discovery, out_fs, out_base, result, started,
                          stream, tty, on_commit).run(plan.pending)
        except SystemExit as exc:  # Ray's own SIGTERM handler, while ray.init runs, exits with the signal
            if exc.code in (signal.SIGTERM, signal.SIGINT):
                _received.append(exc.code)
                raise Interrupted(exc.code) from None
            raise
        finally:
            _cleaning.set()
            if embedded and ray.is_initialized() and not _cluster_gone:
                ray.shutdown()
    finally:
        _cleaning.set()
        try:
            # the owner removes every run's temporaries (an actor of a killed run may have written after this
            # run started); a run that lost the output removes only its own
            if written:
                remove_temporaries(out_fs, out_base, lease.holder.run_id if lease.lost else None)
            lease.release(discard=not written)
        finally:
            _cleaning.clear()
        if len(_received) > signals_before and sys.exc_info()[0] is None:
            stopped = Interrupted(_received[-1])  # stopped while it gave the output back: the cleanup came first
            if "result" in locals():
                result.interrupted = stopped.signum
                stopped.result = result  # the CLI prints what the run did
            raise stopped


_cluster_gone: list[str] = []  # set when the cluster died under a run: no more Ray calls in this process


def _result_of(spec: JobSpec, plan: Plan, discovery: Discovery, takeover: str | None) -> JobResult:
    result = JobResult(shards=len(discovery.shards), skipped=len(plan.done) + len(plan.adopted))
    result.done = result.skipped
    result.notes = [takeover] if takeover else []
    if discovery.skipped:
        kinds = ".jsonl" if spec.input_format == formats.REQUESTS else ".parquet, .csv or .jsonl"
        names = ", ".join(discovery.skipped_names)
        more = f" and {discovery.skipped - len(discovery.skipped_names)} more" if discovery.skipped > len(
            discovery.skipped_names) else ""
        result.notes.append(f"input: {discovery.skipped} files or folders skipped (hidden, _-prefixed, not {kinds} "
                            f"or not regular files): {names}{more}")
    result.notes += _listed(discovery.notes, lambda s: s)
    result.notes += _listed(plan.changed, lambda s: f"{s} changed since its output was committed: reprocessed")
    result.notes += _listed(list(plan.redone.values()), lambda why: f"{why}: redone")
    result.notes += _listed(plan.removed, lambda s: f"{s} is no longer in the input; its output is kept "
                                                    "(--overwrite removes it)")
    result.notes += _listed(list(plan.delete), lambda s: f"removed the output of {s} (its input is gone)")
    result.kept = list(plan.removed)
    for shard, reason in plan.rejected.items():
        result.failed += 1
        result.failures[shard] = reason
    return result


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
    if spec.input_format == formats.REQUESTS:  # OpenAI's batch object counts requests, over the whole job
        manifest.data["summary"]["request_counts"] = formats.request_counts(totals)
    manifest.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        lease.confirm(force=True)
        manifest.save()
        if result.done == result.shards and not result.failed and not result.interrupted and not result.lost:
            lease.confirm(force=True)
            manifest.mark_success()
    except OSError as exc:
        raise write_error(exc, spec.output) from None


class JobRun:
    """The dispatch loop of one run: the dispatcher decides, the pool runs, this executes the decisions."""

    def __init__(self, spec: JobSpec, fingerprint: str, pin: dict, manifest: Manifest, lease: OutputLease,
                 discovery: Discovery, out_fs, out_base: str, result: JobResult, started: float, stream, tty,
                 on_commit) -> None:
        self.spec, self.fingerprint, self.pin, self.manifest, self.lease = spec, fingerprint, pin, manifest, lease
        self.discovery, self.out_fs, self.out_base = discovery, out_fs, out_base
        self.result, self.started, self.on_commit = result, started, on_commit
        self.stream, self.tty = stream, tty

    def run(self, shards: list[tuple[str, ShardInfo]]) -> JobResult:
        r = self.spec.runner
        pool = pool_size(self.spec)
        units = size_for_pool(shards, pool[0], r.rows_per_unit, r.batch_rows)
        layout = actor_layout(self.spec, pool, len(units))
        self.result.layout = layout.describe()
        self.manifest.data["layout"] = layout.as_dict()
        self.dispatcher = Dispatcher(units, r.max_attempts, r.stall_timeout, r.placement_timeout,
                                     backup_tasks=layout.backup_tasks)
        self.progress = Progress(sum(u.rows for u in units), self.result.shards - self.result.skipped,
                                 self.stream, self.tty)
        self.progress.note(self.result.layout)
        worker_args = (self.spec, self.fingerprint, self.lease.holder.run_id, self.pin, self.discovery.fs,
                       self.discovery.base, self.out_fs, self.out_base, layout.device, layout.threads)
        self.pool = Pool(self.dispatcher, worker_args, layout.resources, layout.actors, self.progress.note)
        self.processing = None
        failure: BaseException | None = None
        try:
            self.pool.request(self.pool.target)
            self._loop()
            if not self.dispatcher.stopped:
                self._verify()
        except KeyboardInterrupt as exc:
            self.result.interrupted = signal_of(exc)
        except LeaseLost as exc:
            self.result.lost = str(exc)
        except ClusterFailed as exc:
            _cluster_gone.append(str(exc))
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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failure = JobFailed(f"Ray failed during the job ({type(exc).__name__}: {first}); what is committed is "
                                "kept: rerun the same command to resume")
        finally:
            self.result.backups = dict(self.dispatcher.backups)
            self.pool.kill_all()  # stops their units mid-way; the temporaries are removed by run_job
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
        entry = {"output": final, "attempts": decision.attempts, **decision.stats}
        entry.pop("input_identity", None)
        if decision.identity is not None:
            entry["input_identity"] = decision.identity
        temps, finals = formats.companions(decision.temp, fmt), formats.companions(final, fmt)
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
        for name in formats.companions(temp, formats.REQUESTS if temp.endswith(".jsonl") else "parquet"):
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
