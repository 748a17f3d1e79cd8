#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: sets up .venv, builds a small demo checkpoint,
# tokenizer and Parquet dataset from real text on this machine, runs `persimmon-batch classify` with Ray
# started locally, then shows the summary, the status and a few output rows.
# Usage: bash scripts/demo.sh [DIR]   (default: ./demo-data; output in DIR/output)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
dir="${1:-demo-data}"
"$VENV/bin/python" -m jobs.demo "$dir"
# a rerun of the demo starts over: the demo model is rebuilt with the same seed, so outputs would be skipped
rm -rf "$dir/output"
"$VENV/bin/persimmon-batch" classify --model "$dir/model" --input "$dir/input" --output "$dir/output"
"$VENV/bin/persimmon-batch" status "$dir/output"
"$VENV/bin/python" - "$dir/output" <<'PY'
import sys
import pyarrow.parquet as pq
table = pq.read_table(sys.argv[1] + "/part-00000.parquet").slice(0, 5)
for row in table.to_pylist():
    print(f"{row['id']:>4}  {row['label']:<10} {row['score']:.3f}  {row['text'][:70]!r}")
PY
