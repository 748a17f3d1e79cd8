"""How a run's actors sit on the cluster: how many, on which device, with how many threads or GPUs each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from persimmon.kinds import Kind

from ..errors import UsageError
from ..spec import JobSpec

CPU_THREADS_PER_ACTOR = 4  # default CPU actor size when the number of actors is not given


class Device(Kind):
    """What a run's actors compute on (torch's device type)."""

    CPU = "cpu"
    CUDA = "cuda"


@dataclass
class Layout:
    """How a run's actors sit on the cluster: how many were started, with what each holds."""

    actors: int
    device: Device
    resources: dict[str, Any]  # Ray's resource options per actor
    threads: int | None  # torch threads per CPU actor
    requested: int  # the actors the cluster or --actors allowed (more than started when there are fewer units)
    units: int = 0
    backup_tasks: bool = False

    def describe(self) -> str:
        if self.device == Device.CUDA:
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


def cluster_capacity(spec: JobSpec) -> tuple[int, Device, int]:
    """(actors the job may use, device, the cluster's CPUs) from the cluster's resources and the spec."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), int(resources.get("CPU", 1))
    r = spec.runner
    if gpus >= 1 and r.gpus_per_actor > 0:
        actors = r.actors or max(1, int(gpus // r.gpus_per_actor))
        if actors * r.gpus_per_actor > gpus:  # the rest would wait for GPUs forever
            raise UsageError(f"{actors} actors x {r.gpus_per_actor} GPUs each need {actors * r.gpus_per_actor:g} "
                             f"GPUs; the cluster has {gpus:g}: lower --actors or --gpus-per-actor")
        return actors, Device.CUDA, cpus
    return r.actors or max(1, cpus // CPU_THREADS_PER_ACTOR), Device.CPU, cpus


def actor_layout(spec: JobSpec, capacity: tuple[int, Device, int], units: int) -> Layout:
    """The layout for a job of `units` work units on a cluster's capacity (cluster_capacity): as many actors as
    may run, but no more than there are units; CPU actors share the cluster's CPUs between the actors started (threads follow them:
    one actor on 4 CPUs runs 4 threads, not the 1 it would get as one of 4 requested). Backups default to on
    for a cluster of several nodes (where one slow or throttled node holds a job), off on one machine."""
    requested, device, cpus = capacity
    actors = max(1, min(requested, units))
    backups = spec.runner.backup_tasks
    if backups is None:
        backups = sum(1 for n in ray.nodes() if n.get("Alive")) > 1
    if device == Device.CUDA:
        return Layout(actors, device, {"num_gpus": spec.runner.gpus_per_actor, "num_cpus": 1}, None, requested,
                      units, backups)
    # more actors than CPUs share them (fractional CPUs) rather than wait for CPUs that never come
    return Layout(actors, device, {"num_cpus": min(cpus / actors, max(1, cpus // actors))}, max(1, cpus // actors),
                  requested, units, backups)
