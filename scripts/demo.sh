#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: sets up .venv, builds a small Persimmon base
# model (random weights), a tokenizer and labeled + unlabeled Parquet data from real text on this machine,
# trains a classifier head on the labeled rows (`persimmon-batch train-head`), classifies the other rows
# (`persimmon-batch classify`, Ray started locally), scores the labels against the rows' true source, then
# generates short completions for a few rows with the base model (`persimmon-batch generate`, a stop string).
# Usage: bash scripts/demo.sh [DIR]   (default: the checkout's demo-data; a relative DIR is taken from the folder
# you run it in)
set -euo pipefail
case "${1:-}" in
  "") dir="demo-data" ;;
  /*) dir="$1" ;;
  *) dir="$PWD/$1" ;;
esac
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
pb="$VENV/bin/persimmon-batch"
echo "== persimmon-batch demo: about a minute after the first set-up (which takes a few minutes)"
echo "== building the demo: a random-weight base model, a tokenizer and Parquet rows from this machine's text"
"$VENV/bin/python" -m jobs.demo "$dir" >/dev/null
# a rerun of the demo starts over: its outputs and those of the README's quick start go (a retrained head
# may differ in its last bits, and a job's output refuses another model's results)
# (the head's features too: the labeled files were just written again, so a kept embed output would call
# them changed)
rm -rf "$dir/features" "$dir/classifier" "$dir/output" "$dir/completions" "$dir/daily" "$dir/vectors" \
  "$dir/fields" "$dir/scores" "$dir/batch-results" "$dir/report.html"
echo "== train-head: features of the labeled rows (an embed job on Ray), then a linear head on them"
"$pb" train-head --model "$dir/base" --input "$dir/labeled" --label-column source --output "$dir/classifier" \
  --features "$dir/features"
echo "== classify: the other rows, with the trained classifier"
"$pb" classify --model "$dir/classifier" --input "$dir/input" --output "$dir/output"
"$pb" status "$dir/output"
"$VENV/bin/python" - "$dir" <<'PY'
import collections, json, sys
import pyarrow.parquet as pq
root = sys.argv[1]
table = pq.read_table(root + "/output")
truth, label = table.column("source").to_pylist(), table.column("label").to_pylist()
trained = json.load(open(root + "/classifier/metrics.json"))
counts = {n: c["train"] for n, c in trained["label_counts"].items()}
majority = max(counts, key=counts.get)
accuracy = sum(t == p for t, p in zip(truth, label)) / len(truth)
baseline = sum(t == majority for t in truth) / len(truth)
print(f"\nbase model: random weights; head: trained on {trained['rows']['train']} rows")
print(f"accuracy on {len(truth)} classified rows against their true source: {accuracy:.3f} "
      f"(majority class {majority!r}: {baseline:.3f})")
print(f"\n{'id':>4}  {'source':<10} {'label':<10} {'score':>5}  text")
for row in table.slice(0, 6).to_pylist():
    print(f"{row['id']:>4}  {row['source']:<10} {row['label']:<10} {row['score']:.3f}  {row['text'][:60]!r}")
PY
echo
echo "== generate: 12 new tokens at most for the rows of one shard, stopping at the first full stop"
"$pb" generate --model "$dir/base" --input "$dir/input/part-00000.parquet" --output "$dir/completions" \
  --prompt-template "{text}" --max-new-tokens 12 --stop "." --temperature 0.8
"$VENV/bin/python" - "$dir" <<'PY'
import sys
import pyarrow.parquet as pq
table = pq.read_table(sys.argv[1] + "/completions/part-00000.parquet").slice(0, 4)
print("\nbase model: random weights, so the completions are noise; they show the plumbing\n")
print(f"{'id':>4}  {'finish':<7} {'tokens':>6}  prompt end -> completion")
for row in table.to_pylist():
    print(f"{row['id']:>4}  {row['finish_reason']:<7} {row['completion_tokens']:>6}  "
          f"{row['text'][-30:]!r} -> {row['completion']!r}")
PY
echo
echo "== report: one HTML page of what the classify job did (open it in a browser; it needs no network)"
"$pb" report "$dir/output" --output "$dir/report.html"
