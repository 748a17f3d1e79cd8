"""What in an output folder is ours, and which folders are never an output.

An output folder that exists and holds anything this tool did not write is refused before anything is
written, `--overwrite` included (overwrite replaces our outputs only). Ours are: the manifest and `_SUCCESS`
beside it, the lease records under `_lease/`, journal records under `_journal/`, the temporaries of runs the
manifest names under `_temporary/<run id>/`, the output files the manifest names (with the files committed
beside them, and those of a commit journaled as under way), and files named like an output of this input
whose Parquet metadata carries a persimmon-batch fingerprint (committed by a run that died before recording
them). Anything else, a Spark `_temporary/attempt_0/` included, is someone else's.

System folders (/, /etc, /usr, the home folder itself, ...) are never outputs, and neither is a folder inside
another job's output (it would become that job's foreign files).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import ForeignOutput
from .commit import TEMPORARY
from .paths import join
from .lease import LEASE_DIR, LEASE_NAME
from .manifest import JOURNAL, JOURNAL_NAME, MANIFEST, SUCCESS, WRITE_LEFTOVER, Manifest

# trees the system owns (nothing below them is an output) and folders that are shared roots (an output may be
# below them, never the folder itself)
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
                "/sys", "/run", "/var/lib", "/var/run", "/var/log", "/snap")
SHARED_ROOTS = ("/", "/home", "/root", "/var", "/tmp", "/opt", "/srv", "/mnt", "/media", "/data", "/models")
LISTED = 5  # foreign entries named in the refusal


def system_folder(path: str) -> str | None:
    """Why a local folder cannot be an output, or None."""
    real = os.path.realpath(path)
    for tree in SYSTEM_TREES:
        if real == tree or real.startswith(tree + "/"):
            return f"output {path} is a system folder ({tree}); give a folder of your own"
    home = os.path.realpath(os.path.expanduser("~"))
    if real in SHARED_ROOTS or real == home:
        return f"output {path} is a system folder ({real}); give a folder of its own below it"
    return None


def enclosing_job(fs: pafs.FileSystem, out_base: str) -> str | None:
    """The output folder of another job that `out_base` lies inside, or None (one lookup per level above)."""
    parts = out_base.rstrip("/").split("/")
    for depth in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:depth]) or "/"
        if fs.type_name == "s3" and depth == 1:
            break  # the bucket itself
        try:
            marks = [fs.get_file_info(join(folder, MANIFEST)).type]
            if fs.type_name == "local":
                marks.append(fs.get_file_info(join(folder, LEASE_DIR)).type)
        except OSError:
            continue
        if any(mark != pafs.FileType.NotFound for mark in marks):
            return folder
    return None


def _ours(rel: str, is_dir: bool, named: set[str], runs: set[str], has_manifest: bool) -> bool:
    parts = rel.split("/")
    if is_dir:
        return rel not in named  # a folder is judged by its contents; one where an output should be is not ours
    if rel in named:
        return True
    if len(parts) == 1:
        return rel == MANIFEST or (rel == SUCCESS and has_manifest) or bool(WRITE_LEFTOVER.fullmatch(rel))
    top = parts[0]
    if top == LEASE_DIR:
        return len(parts) == 2 and bool(LEASE_NAME.fullmatch(parts[1]))
    if top == JOURNAL:
        name = parts[1].lstrip(".")
        return len(parts) == 2 and (bool(JOURNAL_NAME.fullmatch(name)) or
                                    bool(JOURNAL_NAME.fullmatch(name.rsplit(".", 1)[0])))
    if top == TEMPORARY:
        return len(parts) >= 3 and parts[1] in runs
    return False


def foreign_entries(listing: list[pafs.FileInfo], out_base: str, manifest: Manifest | None,
                    candidates: set[str]) -> tuple[list[str], list[str]]:
    """(entries that are not ours, files that are ours only if their metadata says so). `candidates`: the
    output names of this job's input shards."""
    prefix = out_base.rstrip("/") + "/"
    named = set()
    for entry in manifest.shards.values() if manifest else ():
        for recorded in (entry, entry.get("committing") or {}):  # a commit under way names its files too
            named.add(recorded.get("output"))
            named.update(recorded.get("companions") or {})
    named.discard(None)
    runs = manifest.runs() if manifest else set()
    foreign, unrecorded = [], []
    for info in listing:
        rel = info.path[len(prefix):]
        is_dir = info.type == pafs.FileType.Directory
        if _ours(rel, is_dir, named, runs, manifest is not None):
            continue
        if not is_dir and rel in candidates:
            unrecorded.append(rel)
        else:
            foreign.append(rel + ("/" if is_dir else ""))
    return sorted(foreign), sorted(unrecorded)


def refuse_foreign(output: str, foreign: list[str]) -> ForeignOutput:
    shown = ", ".join(foreign[:LISTED]) + (f" and {len(foreign) - LISTED} more" if len(foreign) > LISTED else "")
    return ForeignOutput(f"output {output} holds files persimmon-batch did not write ({shown}); nothing was "
                         "changed: give an empty or new folder (--overwrite replaces only this tool's outputs)")


def check_train_head_folder(path: Path) -> None:
    """train-head's output must not be a system folder or inside another job's output."""
    why = system_folder(str(path))
    if why:
        raise ForeignOutput(why.replace("output", "--output", 1))
    enclosing = enclosing_job(pafs.LocalFileSystem(), str(path))
    if enclosing:
        raise ForeignOutput(f"--output {path} is inside the output of another job ({enclosing}); give a folder "
                            "outside it")
