"""The package boundaries hold: the storage layer (jobs/output) and the resolving of a job (jobs/resolve.py,
what the CLI runs before it imports Ray) import with neither Ray nor torch present, and the dispatcher (the
runner's policy) with no Ray."""

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


def test_the_storage_layer_needs_neither_ray_nor_torch():
    modules = ["jobs.output.discovery", "jobs.output.commit", "jobs.output.manifest", "jobs.output.lease",
               "jobs.output.ownership", "jobs.output.plan", "jobs.output.checksum", "jobs.errors", "jobs.resolve"]
    result = imports_without({"ray", "torch"}, modules)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_the_policy_needs_no_ray():
    result = imports_without({"ray", "torch"}, ["jobs.execution.dispatcher"])
    assert result.returncode == 0, result.stderr


def test_the_block_is_real():
    result = imports_without({"ray"}, ["jobs.execution.pool"])
    assert result.returncode != 0 and "ray is not available here" in result.stderr
