"""The execution layer: the dispatcher (the runner's policy, pure), the Ray pool that carries it out, the
actor (worker), progress display, cluster authentication and job submission."""
