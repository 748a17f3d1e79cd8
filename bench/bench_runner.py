"""The runner's costs, measured against the in-process pipeline in one run.

    .venv/bin/python bench/bench_runner.py overhead [--rows 2000]
    .venv/bin/python bench/bench_runner.py memory [--rows 2000]
    .venv/bin/python bench/bench_runner.py shards [--sizes 100,1000,10000]
    .venv/bin/python bench/bench_runner.py actors [--rows 2000]
    .venv/bin/python bench/bench_runner.py unequal [--rows 4000]

overhead: end-to-end rows/s of `persimmon-batch classify` with one actor (embedded Ray; startup, i.e. Ray and
model loading, excluded and reported apart) against ClassificationPipeline called in this process on the
same record batches; the bench classification model (hidden 512, 6 layers) and real-text rows.
memory: peak resident memory of the driver and of the actor for a run over N rows and over 10x N rows
(same shard count, 10x longer shards, same text distribution, full record batch windows in both): streaming
keeps both flat.
shards: the driver's bookkeeping as the shard count grows: jobs of 100 to 10,000 shards of 5 rows each on
the small demo classifier (so the model costs little), one actor; processing time per shard (commit,
manifest record, progress, dispatch) and planning time per shard (listing, footers) should stay flat.
actors: one file of 4 row groups, `--actors 1` then `--actors 2` then `--actors 1` again (the machine's drift
falls on both sides) on this machine's CPUs: the job's rows/s with 2 actors over that with 1. The planner cuts
the file into units for both actors; each actor runs half the CPUs' threads.
unequal: 8 shards of very unequal size (1, 1, 1, 1, 2, 4, 8 and 14 parts in 32 of the rows) with 2 actors:
processing time (first actor loaded to the end) over the ideal, the actors' busy time (every unit's seconds,
from the manifest) divided by the 2 actors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import build, machine

from jobs.corpus import paragraphs

ROOT = Path(__file__).resolve().parents[1]


def write_shards(folder: Path, rows: int, shards: int = 4, pool: int | None = None) -> None:
    """Shards of real-text rows; with `pool`, texts cycle through the first `pool` paragraphs (so datasets of
    different sizes have the same length distribution)."""
    texts = list(paragraphs())[:pool]
    folder.mkdir(parents=True)
    per = rows // shards
    for s in range(shards):
        ids = range(s * per, (s + 1) * per)
        pq.write_table(pa.table({"id": list(ids), "text": [texts[i % len(texts)] for i in ids]}),
                       folder / f"part-{s:05d}.parquet", row_group_size=1000)


def run_job_here(model: Path, input: Path, output: Path, actors: int = 1, batch_rows: int = 1024) -> dict:
    """A job run in a child process (its own driver), reporting its JobResult and the driver's peak RSS."""
    code = f"""
import json, resource
from jobs.runner import run_job
from jobs.spec import JobSpec, RunnerSettings
r = run_job(JobSpec("classify", {str(model)!r}, {str(input)!r}, {str(output)!r}, options={{"dtype": "float32"}},
                    runner=RunnerSettings(actors={actors}, batch_rows={batch_rows})), tty=False)
print(json.dumps({{"rows": r.rows, "seconds": r.seconds, "startup": r.startup_seconds, "ok": r.ok,
                  "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((output / "_manifest.json").read_text())
    result["actor_peak_mb"] = max(s.get("peak_rss_mb", 0) for s in manifest["shards"].values())
    return result


def overhead(args, work: Path, model: Path) -> None:
    from pipelines import ClassificationPipeline

    write_shards(work / "input", args.rows)
    pipe = ClassificationPipeline(model, dtype="float32")
    batches = [b for f in sorted((work / "input").glob("*.parquet")) for b in pq.ParquetFile(f).iter_batches(1024)]
    pipe(batches[0].slice(0, 32))  # warm-up

    def in_process() -> float:
        start = time.perf_counter()
        for b in batches:
            pipe(b)
        return args.rows / (time.perf_counter() - start)

    before = in_process()
    job = run_job_here(model, work / "input", work / "out")
    after = in_process()  # measured on both sides of the job: drift of the machine's speed falls on both
    inproc = (before + after) / 2
    e2e = job["rows"] / job["seconds"]
    print(f"{args.rows} rows, {machine()}")
    print(f"in-process pipeline: {inproc:.1f} rows/s (before the job {before:.1f}, after {after:.1f})")
    print(f"persimmon-batch, 1 actor: {e2e:.1f} rows/s (startup {job['startup']:.1f} s excluded)")
    print(f"ratio end-to-end / in-process: {e2e / inproc:.1%}")


def memory(args, work: Path, model: Path) -> None:
    runs = {}
    window = 125  # rows per record batch: both runs fill their windows
    for scale in (1, 10):
        write_shards(work / f"input{scale}", args.rows * scale, shards=2, pool=args.rows)
        runs[scale] = run_job_here(model, work / f"input{scale}", work / f"out{scale}", batch_rows=window)
    small, large = runs[1], runs[10]
    print(f"{args.rows} vs {10 * args.rows} rows in 2 shards, {window}-row windows, texts from the same "
          f"{args.rows} paragraphs; {machine()}")
    for who in ("driver", "actor"):
        a, b = small[f"{who}_peak_mb"], large[f"{who}_peak_mb"]
        print(f"{who} peak RSS: {a:.0f} MB vs {b:.0f} MB at 10x rows ({b / a - 1:+.1%})")


def shards(args, work: Path) -> None:
    from jobs.demo import build_demo

    model = build_demo(work / "demo", shards=1, rows_per_shard=5, vocab_size=800) / "model"
    texts = list(paragraphs())
    print(f"5-row shards, demo classifier (hidden 256, 4 layers), 1 actor; {machine()}")
    print(f"{'shards':>7} {'processing':>11} {'per shard':>10} {'startup':>8} {'manifest':>9}")
    for n in [int(x) for x in args.sizes.split(",")]:
        folder = work / f"in{n}"
        folder.mkdir()
        for s in range(n):
            ids = range(5 * s, 5 * s + 5)
            pq.write_table(pa.table({"id": list(ids), "text": [texts[i % len(texts)][:200] for i in ids]}),
                           folder / f"part-{s:06d}.parquet")
        job = run_job_here(model, folder, work / f"out{n}", batch_rows=64)
        size = (work / f"out{n}" / "_manifest.json").stat().st_size
        print(f"{n:>7} {job['seconds']:>10.1f}s {1000 * job['seconds'] / n:>8.1f}ms {job['startup']:>7.1f}s "
              f"{size / 1024:>7.0f}KiB", flush=True)


def one_file(folder: Path, rows: int, groups: int) -> None:
    texts = list(paragraphs())
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(rows)), "text": [texts[i % len(texts)] for i in range(rows)]}),
                   folder / "events.parquet", row_group_size=-(-rows // groups))


def actors(args, work: Path, model: Path) -> None:
    one_file(work / "input", args.rows, groups=4)
    runs = []
    for i, count in enumerate((1, 2, 1)):
        job = run_job_here(model, work / "input", work / f"out{i}", actors=count, batch_rows=128)
        layout = json.loads((work / f"out{i}" / "_manifest.json").read_text())["layout"]
        runs.append(job["rows"] / job["seconds"])
        print(f"--actors {count}: {runs[-1]:.1f} rows/s ({layout['actors']} actors x {layout['threads_per_actor']} "
              f"threads, {layout['units']} units; processing {job['seconds']:.1f} s)", flush=True)
    one = (runs[0] + runs[2]) / 2
    print(f"{args.rows} rows in one file of 4 row groups; {machine()}")
    print(f"ratio 2 actors / 1 actor: {runs[1] / one:.2f}")


def unequal(args, work: Path, model: Path) -> None:
    texts = list(paragraphs())
    folder = work / "input"
    folder.mkdir(parents=True)
    weights = [1, 1, 1, 1, 2, 4, 8, 14]
    start = 0
    for s, w in enumerate(weights):
        n = args.rows * w // sum(weights)
        ids = range(start, start + n)
        start += n
        pq.write_table(pa.table({"id": list(ids), "text": [texts[i % len(texts)] for i in ids]}),
                       folder / f"part-{s:05d}.parquet", row_group_size=1000)
    job = run_job_here(model, folder, work / "out", actors=2, batch_rows=128)
    manifest = json.loads((work / "out" / "_manifest.json").read_text())
    busy = sum(entry["seconds"] for entry in manifest["shards"].values())
    ideal = busy / manifest["layout"]["actors"]
    print(f"{args.rows} rows in 8 shards of {', '.join(map(str, weights))} parts; {machine()}")
    print(f"layout: {manifest['layout']}")
    print(f"processing {job['seconds']:.1f} s; ideal (actors' busy time {busy:.1f} s / 2) {ideal:.1f} s; "
          f"ratio {job['seconds'] / ideal:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "memory", "shards", "actors", "unequal"])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--sizes", default="100,1000,10000", help="shards: shard counts to run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="persimmon-runner-bench-"))
    if args.what == "shards":
        return shards(args, work)
    _, model = build("seqcls", workdir=str(work / "model-build"), num_labels=4, pad_token_id=None)
    {"overhead": overhead, "memory": memory, "actors": actors, "unequal": unequal}[args.what](args, work, model)


if __name__ == "__main__":
    main()
