"""Sending a job file's run to a Ray cluster through the Jobs API, and following it."""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BatchError


def submission_id(name: str, date: str) -> str:
    """The Ray job id of a job file's run for a date: the same trigger twice gets the same id."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{name}-{date}").strip("-")


class AlreadySubmitted(BatchError):
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
