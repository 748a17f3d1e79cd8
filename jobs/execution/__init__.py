"""The execution layer: the dispatcher (the runner's policy, pure), the Ray pool that carries it out, the
actor (worker), the cluster connection (cluster), the actors' layout (layout), stop signals (signals), a run's
results (results), progress display, cluster authentication and job submission."""
