"""Scheduling recipes for a job file: a crontab line, a systemd service + timer, a Kubernetes CronJob.

Each runs `persimmon-batch run JOB.toml` once a day; the run's date defaults to the file's `date` (e.g.
"yesterday" for a nightly job over the day that just ended), and reruns of a date are no-ops.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

FORMATS = ("cron", "systemd", "k8s")


def _command(job: Path) -> list[str]:
    exe = shutil.which("persimmon-batch") or str(Path(sys.executable).parent / "persimmon-batch")
    return [exe, "run", str(job.resolve())]


def _unit_name(name: str) -> str:
    return "persimmon-batch-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def k8s_warnings(raw: dict) -> list[str]:
    """What in a job file will not hold inside a Kubernetes pod: paths relative to the job file (the pod sees
    the file at /jobs, not where it is here), a model on this machine's disk, no Ray cluster to join."""
    found = []
    for key in ("input", "output", "model"):
        value = str(raw.get(key) or "")
        if value and "://" not in value and not value.startswith("/"):
            found.append(f"{key} {value!r} is relative: in the pod it resolves against /jobs (where the job file is "
                         "mounted), not this machine's folder; give an absolute path on a mounted volume or a URI")
    model = str(raw.get("model") or "")
    if model.startswith("/") and not model.startswith(("/models/", "/mnt/", "/data/")):
        found.append(f"model {model!r} is a local path: the image or a volume must hold it at that path in the pod")
    if not (raw.get("runner") or {}).get("address"):
        found.append("the job file sets no runner.address: the pod starts a Ray of its own and runs on that one "
                     "pod's CPUs and GPUs; set runner.address to the cluster's head (e.g. a KubeRay head service)")
    return found


def render(job: Path, name: str, fmt: str, at: str = "02:00", image: str = "persimmon-batch:latest",
           log: str | None = None, warnings: list[str] = ()) -> str:
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", at)
    if not match:
        raise ValueError(f"--at must be HH:MM (UTC), got {at!r}")
    hour, minute = int(match.group(1)), int(match.group(2))
    # every value printed into a recipe is one line of plain characters: nothing can start a line of its own
    for what, value in (("job name", name), ("job file path", str(job.resolve())), ("image", image)):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"{what} {value!r} holds control characters (a newline would add lines to the recipe)")
    command = _command(job)
    if fmt == "cron":
        log = log or f"/var/log/{_unit_name(name)}.log"
        line = f"{shlex.join(command)} >> {shlex.quote(log)} 2>&1".replace("%", "\\%")  # cron: % is a newline
        return (f"# {name}: daily at {at} UTC (set CRON_TZ=UTC or adjust to the machine's zone)\n"
                f"{minute} {hour} * * * {line}\n")
    if fmt == "systemd":
        unit = _unit_name(name)
        return (f"# /etc/systemd/system/{unit}.service\n"
                f"[Unit]\nDescription=persimmon-batch job {name}\n\n"
                f"[Service]\nType=oneshot\nExecStart={shlex.join(command).replace('%', '%%')}\n\n"  # % starts a specifier
                f"# /etc/systemd/system/{unit}.timer  (then: systemctl enable --now {unit}.timer)\n"
                f"[Unit]\nDescription=Daily persimmon-batch job {name}\n\n"
                f"[Timer]\nOnCalendar=*-*-* {hour:02d}:{minute:02d}:00 UTC\nPersistent=true\n\n"
                f"[Install]\nWantedBy=timers.target\n")
    if fmt == "k8s":
        unit = _unit_name(name).lower()[:52]
        args = ", ".join(json.dumps(a) for a in ["persimmon-batch", "run", f"/jobs/{job.name}"])  # YAML flow strings
        notes = "".join(f"# WARNING: {w}\n" for w in warnings)
        return (f"{notes}# A daily Kubernetes CronJob; the container joins the Ray cluster named in the job file's\n"
                f"# runner.address (e.g. a KubeRay RayCluster's head service) and mounts the job file at /jobs.\n"
                f"apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: {unit}\n"
                f"spec:\n  schedule: \"{minute} {hour} * * *\"\n  timeZone: \"Etc/UTC\"\n"
                f"  concurrencyPolicy: Forbid\n  jobTemplate:\n    spec:\n      backoffLimit: 2\n"
                f"      template:\n        spec:\n          restartPolicy: Never\n          containers:\n"
                f"            - name: persimmon-batch\n              image: {image}\n"
                f"              command: [{args}]\n              volumeMounts:\n"
                f"                - {{name: job, mountPath: /jobs}}\n          volumes:\n"
                f"            - name: job\n              configMap: {{name: {unit}-job}}\n")
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
