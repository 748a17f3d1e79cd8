"""The storage layer: what is on disk and who may write it. Paths (paths.py), output files and how they are
written (sinks.py), their atomic commit, the manifest and its journal, the output lease, ownership of an
output folder. No Ray and no torch here (tests/jobs/test_layers.py imports it with both unavailable)."""
