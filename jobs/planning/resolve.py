"""One job, resolved once before Ray starts: the spec validated (options, model, window, constraint against the
model's vocabulary) and everything the run will read checked (the input discovered by identity, the output's
place and ownership, the model's checksum, pinned files and config, the fingerprint of what the job
produces). The runner, and the CLI before it imports Ray, take the result; neither checks again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import ForeignOutput, UsageError
from ..inputs.checksum import model_checksum, pin_model
from ..inputs.discovery import Discovery, discover, output_overlap
from ..output.manifest import Manifest
from ..output.ownership import enclosing_job, system_folder
from ..output.paths import resolve
from .plan import check_ownership, check_text_column, list_output
from ..spec import JobSpec


@dataclass
class ResolvedJob:
    """What a run reads and writes, checked before anything is written: the input (discovered by identity),
    the output, the model (checksum, pinned files, config) and the fingerprint of what the job produces."""

    spec: JobSpec
    discovery: Discovery
    out_fs: Any
    out_base: str
    checksum: str
    pin: dict
    config: Any
    fingerprint: str
    seconds: float  # how long resolving took (the start of a run's start-up)


def resolve_job(spec: JobSpec) -> ResolvedJob:
    """The spec validated and everything a run reads checked, before Ray starts and before anything is
    written (step 1 of jobs/runner.py): raises the BatchError that says what is wrong."""
    started = time.perf_counter()
    spec.validate()
    from persimmon.config import PersimmonConfig
    from persimmon.files import load_dtype

    out_fs, out_base = resolve(spec.output)
    discovery = discover(spec.input, output=(out_fs, out_base), input_format=spec.input_format)
    check_text_column(spec, discovery)
    check_output_place(spec, out_fs, out_base, discovery)
    read_manifest(out_fs, out_base, discovery, spec)  # refuse someone else's folder before writing into it
    checksum = model_checksum(spec.model)
    pin = pin_model(spec.model, checksum)
    config = PersimmonConfig.from_pretrained(spec.model)
    fingerprint = spec.fingerprint(checksum, load_dtype(spec.model, spec.options.dtype), config)
    return ResolvedJob(spec, discovery, out_fs, out_base, checksum, pin, config, fingerprint,
                       time.perf_counter() - started)


def output_columns(spec: JobSpec, config) -> list[str]:
    from pipelines.schema import added_columns
    from pipelines.tasks import TASKS

    return added_columns(TASKS[spec.task].columns(config, spec.options)).names


def check_output_place(spec: JobSpec, out_fs, out_base: str, discovery: Discovery) -> None:
    """An output that is a system folder, a file, inside the input or inside another job's output: refused
    before anything is written."""
    import pyarrow.fs as pafs

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


def read_manifest(out_fs, out_base: str, discovery: Discovery, spec: JobSpec):
    """(manifest or None, listing, recognised unrecorded files): the output's state, ownership checked."""
    listing = list_output(out_fs, out_base)
    manifest = Manifest.load(out_fs, out_base)
    recognised = check_ownership(spec.output, out_fs, out_base, listing, manifest, discovery)
    return manifest, listing, recognised
