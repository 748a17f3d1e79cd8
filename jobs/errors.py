"""One error model for every command: each error a user can meet carries its exit status, and the CLI turns any
of them into one `error:` line (the traceback only under --debug).

Exit statuses (also in docs/guarantees.md):
    0   every input row has its output row
    1   shards failed (their reasons in the summary), or the job failed under way (the output could not be
        written, the model changed while the job ran, an unexpected error)
    2   bad arguments or a refused job, before anything was written
    3   `status`: the job is incomplete (shards left to do)
    69  the cluster failed under the job (a node or the GCS died, actors could not be placed): rerun to resume
    75  another run holds the output, or took it over from this one: try again later
    128 + signal: stopped by Ctrl-C (130) or SIGTERM (143): rerun to resume
"""

from __future__ import annotations

import enum
import signal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_BUSY = 75  # EX_TEMPFAIL
EXIT_SIGNALED = 128  # + the signal's number: stopped by a signal


def exit_for_signal(signum: int) -> int:
    return EXIT_SIGNALED + signum


class ShardState(str, enum.Enum):
    """A shard's state in the manifest (stored as its value)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    INPUT_REMOVED = "input_removed"  # committed once, its input gone since: the output is kept


class BatchError(Exception):
    """An error the user acts on; `exit_code` is the command's exit status."""

    exit_code = EXIT_FAILED


class UsageError(BatchError, ValueError):
    """Bad arguments, input, output or model: refused before anything is written."""

    exit_code = EXIT_USAGE


class JobConflict(UsageError):
    """The output holds results of a different model or options; rerun with overwrite to replace them."""


class ForeignOutput(UsageError):
    """The output holds files persimmon-batch did not write (or is a system folder, or another job's)."""


class JobFailed(BatchError):
    """The job stopped under way: the output could not be written, the model changed, Ray failed."""


class ModelChanged(JobFailed):
    """The checkpoint on disk is not the one the job started with."""


class ClusterFailed(BatchError):
    """A node or the GCS died, or actors could not be placed: the run ends, a rerun resumes."""

    exit_code = EXIT_UNAVAILABLE


class OutputBusy(BatchError, RuntimeError):
    """Another live run holds the output directory."""

    exit_code = EXIT_BUSY


class LeaseLost(OutputBusy):
    """Another run took the output over, or this run's lease is gone: it commits nothing more."""


class Interrupted(BatchError, KeyboardInterrupt):
    """Ctrl-C or SIGTERM (how schedulers and Kubernetes stop a job): stop, keep what is committed."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return exit_for_signal(self.signum)


def write_error(exc: OSError, where: str) -> JobFailed:
    """An OSError from writing the output (disk full, read-only, gone) as one line."""
    reason = exc.strerror or str(exc)
    return JobFailed(f"cannot write to output {where}: {reason}; what is committed is kept: rerun the same "
                     "command to resume")
