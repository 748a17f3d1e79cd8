"""The storage layer: what is on disk and who may write it. Input discovery and identity, output files and
their atomic commit, the manifest and its journal, the output lease, ownership of an output folder, the
run's plan and its end-of-run check, the model's checksum and pin. No Ray and no torch here
(tests/jobs/test_layers.py imports it with both unavailable)."""
