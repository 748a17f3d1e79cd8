"""The package boundaries hold: the storage layer (jobs/output), the inputs layer (jobs/inputs) and the
planning layer (jobs/planning: the job resolved before the CLI imports Ray, the plan, the work units) import
with neither Ray nor torch present; so do the two policies, the run's dispatcher and the engine's scheduler."""

from __future__ import annotations

import subprocess
import sys

BLOCK = ("import sys\n"
         "class Missing:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in {blocked!r}:\n"
         "            raise ImportError(f'{{name}} is not available here')\n"
         "sys.meta_path.insert(0, Missing())\n")


def imports_without(blocked: set[str], modules: list[str]) -> subprocess.CompletedProcess:
    code = BLOCK.format(blocked=blocked) + "".join(f"import {m}\n" for m in modules) + "print('imported')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_storage_inputs_and_planning_need_neither_ray_nor_torch():
    modules = ["jobs.output.paths", "jobs.output.sinks", "jobs.output.commit", "jobs.output.manifest",
               "jobs.output.lease", "jobs.output.ownership", "jobs.inputs.discovery", "jobs.inputs.formats",
               "jobs.inputs.checksum", "jobs.planning.units", "jobs.planning.plan", "jobs.planning.resolve",
               "jobs.errors"]
    result = imports_without({"ray", "torch"}, modules)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_the_policies_need_neither_ray_nor_torch():
    """The run's dispatcher and the engine's slot scheduler: tested on made-up results in milliseconds."""
    result = imports_without({"ray", "torch"}, ["jobs.execution.dispatcher", "persimmon.scheduler"])
    assert result.returncode == 0, result.stderr


def test_batch_request_parsing_and_rendering_need_no_torch():
    """OpenAI batch lines are parsed and answered without the model (pipelines/batch_api requests, responses)."""
    result = imports_without({"ray", "torch"}, ["pipelines.batch_api.requests", "pipelines.batch_api.responses"])
    assert result.returncode == 0, result.stderr


def test_the_report_needs_neither_ray_nor_torch():
    """A report is read from the output's files: it opens where neither is installed (a laptop, a CI job)."""
    result = imports_without({"ray", "torch"}, ["jobs.report", "jobs.report.figures", "jobs.report.drift",
                                                "jobs.report.page"])
    assert result.returncode == 0, result.stderr


def test_the_block_is_real():
    result = imports_without({"ray"}, ["jobs.execution.pool"])
    assert result.returncode != 0 and "ray is not available here" in result.stderr
