"""Score a model on AIME-style problems: problems -> samples -> extracted integer answers -> metrics.

    # sampled, DeepSeek-R1 protocol (T=0.6, top-p 0.95, up to 32,768 new tokens), 4 samples per problem
    python eval_aime.py --model DIR --data ../shared/data/aime24.jsonl --out runs/aime24.jsonl
    # greedy: one noisy draw
    python eval_aime.py --model DIR --data ../shared/data/aime24.jsonl --temperature 0 --samples 1 --out runs/greedy.jsonl
    # any OpenAI-compatible endpoint (key from $OPENAI_API_KEY, or --api-key-env NAME)
    python eval_aime.py --base-url http://127.0.0.1:8000/v1 --api-model NAME --data ... --out ...
    # one process per GPU; rank 0 merges
    torchrun --nproc_per_node 8 eval_aime.py --model DIR --data ... --out runs/aime24.jsonl

Writes one JSON line per sample to --out as it arrives, `<out>.config.json` (what the samples depend
on: rerunning with the same --out resumes, a different configuration is refused) and
`<out>.summary.json` (every metric, the configuration and the run manifest: this file is the run's
run.json). Raising --samples on the same --out reuses the samples already drawn: sample k of a problem
has its own seed, whatever K is.

What it is not: a general math grader. Answers are integers compared by equality; there is no
symbolic equivalence and no "last number in the text" fallback.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import model
import sample
from sample import Request

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def user_prompt(problem):
    """The user turn: also what distill.py sends the teacher and what sft.py trains on."""
    return f"{problem}\n\n{PROMPT_SUFFIX}"


# ---- answer extraction ----

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# \text{33} -> 33, but \text{ minutes} (no digit: a unit or a word) -> removed
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mathbf|mbox|boldsymbol)\s*\{([^{}]*)\}")
# degrees, percent, dollars, LaTeX spacing (\! \, \; \: "\ "), ties and whitespace carry no value
_NOISE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|\\%|%|\\\$|\$|\\[!,;: ]|~|\s")


def last_box(text):
    """Content of the last \\boxed{...} / \\fbox{...} (or `\\boxed 5`); None if the last one is unclosed."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    i = boxes[-1].end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            if text[j] == "\\":               # \{ and \} are literal braces, not grouping
                j += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
            j += 1
        return None                            # truncated mid-answer: no fallback to an earlier box
    token = re.match(r"[^\s$]+", text[i:])     # `\boxed 204` as models write it (LaTeX would box "2")
    return token.group(0) if token else None


def parse_integer(s):
    """'033' -> 33, '\\text{33}' -> 33, '33^\\circ' -> 33, '25\\%' -> 25, 'm+n=33' -> 33, '1,000' -> 1000,
    '-1' -> -1, '33.0' -> 33. Fractions, lists ('3, 5'), expressions and bare words -> None."""
    s = s.replace("\u2212", "-").replace("{,}", ",")   # unicode minus; LaTeX's 1{,}000
    while (unwrapped := _WRAPPER.sub(lambda m: m.group(1) if re.search(r"\d", m.group(1)) else "", s)) != s:
        s = unwrapped
    s = _NOISE.sub("", s)
    s = s.rsplit("=", 1)[-1].rstrip(".")       # "m+n=33": the answer is what the box equates to
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", s):  # commas only as thousands groups; "3,5" is a list
        s = s.replace(",", "")
    m = re.fullmatch(r"([-+]?\d+)(\.0*)?", s)
    return int(m.group(1)) if m else None


def extract_answer(text):
    """The integer in the last box after the reasoning, or None. Reasoning ends at the last </think>;
    a <think> that never closes means the model stopped while still thinking: no answer."""
    if not text:
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None
    box = last_box(text)
    return None if box is None else parse_integer(box)


# ---- metrics (pure) ----

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k of the n samples is correct), c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers):
    """Most frequent answer, ignoring None; a tie goes to the tied answer that appeared first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def mean_stderr(values):
    """Mean and its standard error (sample std / sqrt(n)); the error is None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def ci95(mean, se):
    return None if se is None else [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)]


def summarize(problems, records, samples, greedy=False):
    """Metrics over the first `samples` samples of each problem. records: {(id, k): record}."""
    per_problem, rows = [], []
    for p in problems:
        rs = [records[(p["id"], k)] for k in range(samples)]
        answers = [r["extracted"] for r in rs]
        votes = Counter(answers)
        order = sorted(votes, key=lambda a: (-votes[a], answers.index(a)))
        maj = majority(answers)
        per_problem.append({"id": p["id"], "gold": p["answer"], "correct": sum(r["correct"] for r in rs),
                            "samples": samples, "majority": maj, "majority_correct": maj == p["answer"],
                            "votes": {("none" if a is None else str(a)): votes[a] for a in order}})
        rows += rs
    pass1, se = mean_stderr([pp["correct"] / samples for pp in per_problem])
    metrics = {"problems": len(problems), "samples_per_problem": samples,
               "greedy_accuracy": pass1 if greedy else None,
               "pass@1": pass1, "pass@1_stderr": se, "pass@1_ci95": ci95(pass1, se)}
    k = 2
    while k <= samples:
        metrics[f"pass@{k}"] = sum(pass_at_k(samples, pp["correct"], k) for pp in per_problem) / len(problems)
        k *= 2
    metrics[f"maj@{samples}"] = sum(pp["majority_correct"] for pp in per_problem) / len(problems)
    metrics["no_answer_rate"] = sum(r["extracted"] is None for r in rows) / len(rows)
    metrics["truncation_rate"] = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    metrics["mean_tokens"] = sum(r["num_tokens"] for r in rows) / len(rows)
    metrics["max_tokens"] = max(r["num_tokens"] for r in rows)
    return metrics, per_problem


# ---- problems ----

def _first(row, keys):
    return next((row[k] for k in keys if k in row), None)


def gold_integer(value):
    """An answer field as an int ("033", 33, 33.0), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    return None


def load_problems(path):
    """JSONL rows {"id", "problem", "answer"} (also ID / question / Problem / Question / Answer).
    A row without an id gets "line-N". Any bad row is an error naming the file and line."""
    problems, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            pid = _first(row, ("id", "ID"))
            pid = f"line-{lineno}" if pid is None else str(pid)
            text = _first(row, ("problem", "question", "Problem", "Question"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: no problem text (field problem / question)")
            raw = _first(row, ("answer", "Answer"))
            answer = gold_integer(raw)
            if answer is None:
                raise ValueError(f"{where}: answer {raw!r} is not an integer")
            if pid in seen:
                raise ValueError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            problems.append({"id": pid, "problem": text, "answer": answer})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def sample_seed(seed, pid, k):
    """A 31-bit seed for sample k of problem pid: stable across runs, shards and values of K."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}:{k}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# ---- the records file: append-only, resumable, one file per shard ----

def sidecar(out, what):
    return Path(f"{out}.{what}.json")


def shard_file(out, rank, world):
    return out if world == 1 else Path(f"{out}.shard{rank}of{world}")


def record_files(out):
    return [out] + sorted(Path(p) for p in glob.glob(glob.escape(str(out)) + ".shard*of*"))


def read_records(path, repair=False):
    """Complete lines of a records file. The text after the last newline is a line torn by a kill:
    cut off when repair is set (by the file's own writer), otherwise ignored (another rank may be writing)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: corrupt record in the middle of the file") from None
    return rows


def load_records(out, own=None):
    """{(id, sample): record} over the main file and all shard files; the first copy wins."""
    done = {}
    for path in record_files(out):
        for r in read_records(path, repair=path == own):
            done.setdefault((r["id"], r["sample"]), r)
    return done


def model_fingerprint(folder):
    """Changes when the folder is retrained in place: its config.json, run.json and weight file sizes."""
    if not folder or not Path(folder).is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.name in ("config.json", "run.json"):
            h.update(p.name.encode() + p.read_bytes())
        elif p.suffix == ".safetensors":
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()


def run_config(args, params):
    """Everything a sample depends on. Not here: --samples, --limit, --shard, batch size, concurrency,
    timeout (they choose which samples to draw or how fast, never what a sample is)."""
    return {"data_sha256": model.sha256_file(args.data),
            "model": str(Path(args.model).resolve()) if args.model else None,
            "model_fingerprint": model_fingerprint(args.model),
            "base_url": args.base_url, "api_model": args.api_model,
            "prompt": "raw" if args.raw_prompt else "chat", "prompt_suffix": PROMPT_SUFFIX, "system": args.system,
            **dataclasses.asdict(params), "seed": args.seed, "device": args.device, "dtype": args.dtype}


def check_config(out, config):
    """Store the configuration next to a new --out; refuse to mix samples from a different one."""
    path = sidecar(out, "config")
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise SystemExit(f"eval_aime.py: {out} holds samples from a different configuration ({changes}). "
                             f"Use another --out, or delete {out}* to start over.")
    elif any(p.exists() for p in record_files(out)):
        raise SystemExit(f"eval_aime.py: {out} exists but {path} does not: cannot tell how those samples "
                         f"were made. Use another --out, or delete {out}.")
    else:
        model.write_json_atomic(path, config)


def merge(out, done, problems):
    """Rewrite --out as every record (also those outside this run's --limit / --samples), in data
    order, with answers re-extracted by the current code; then drop the shard files. Atomic: a kill here leaves the old files, which resume reads again."""
    gold = {p["id"]: p["answer"] for p in problems}
    order = {pid: i for i, pid in enumerate(gold)}
    rows = sorted(done.values(), key=lambda r: (order.get(r["id"], len(order)), str(r["id"]), r["sample"]))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            r["extracted"] = extract_answer(r["text"])
            r["correct"] = r["id"] in gold and r["extracted"] == gold[r["id"]]
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    for p in record_files(out)[1:]:
        p.unlink(missing_ok=True)             # another shard may be merging the same records


# ---- sampling ----

def make_request(problem, k, seed, raw, system=None):
    text = user_prompt(problem["problem"])
    s = sample_seed(seed, problem["id"], k)
    if raw:
        return Request(prompt=text, seed=s)
    system_turn = [{"role": "system", "content": system}] if system else []
    return Request(messages=system_turn + [{"role": "user", "content": text}], seed=s)


def draw(sampler, todo, params, args, path, done, bar):
    """Sample every (problem, k) in todo; append each record to path as it arrives, flushed, so a
    kill loses only the samples in flight. (No fsync: a killed process's writes survive in the page cache.)"""
    requests = [make_request(p, k, args.seed, args.raw_prompt, args.system) for p, k in todo]
    # An endpoint request that fails for good must not throw away the others in flight: collect it,
    # keep going, fail at the end. A rerun retries just the failed ones.
    kw = {"errors": "yield"} if isinstance(sampler, sample.EndpointSampler) else {}
    start, tokens, failed = time.time(), 0, []
    f = open(path, "a", encoding="utf-8") if path else None
    try:
        for i, c in sampler.generate(requests, params, **kw) if requests else ():
            p, k = todo[i]
            if isinstance(c, Exception):
                failed.append(f"{p['id']} sample {k}: {c}")
                continue
            extracted = extract_answer(c.text)
            r = {"id": p["id"], "sample": k, "seed": requests[i].seed, "gold": p["answer"],
                 "extracted": extracted, "correct": extracted == p["answer"],
                 "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
                 "text": c.text, "reasoning": c.reasoning, "usage": c.usage}
            done[(p["id"], k)] = r
            if f:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
            tokens += c.num_tokens
            bar.update(1)
    finally:
        if f:
            f.close()
    if failed:
        saved = f"; the other samples are in {path}: rerun the same command to resume" if path else ""
        raise SystemExit(f"eval_aime.py: {len(failed)} requests failed, first: {failed[0]}{saved}")
    seconds = time.time() - start
    return {"new_samples": len(todo), "new_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds if seconds > 0 else None}


def shard_of(arg):
    """(rank, world, wait_for_others): --shard i/N, else torchrun's RANK/WORLD_SIZE, else (0, 1).
    Under torchrun the ranks run together, so rank 0 waits for the others and merges; with --shard
    they may run one after another, so whichever shard finds all samples in merges."""
    if arg:
        m = re.fullmatch(r"(\d+)/(\d+)", arg)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise SystemExit(f"eval_aime.py: --shard wants i/N with 0 <= i < N, got {arg!r}")
        return int(m.group(1)), int(m.group(2)), False
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (int(os.environ.get("RANK", 0)), world, True) if world > 1 else (0, 1, False)


# ---- report ----

def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(metrics, per_problem, stats, args):
    m, se = metrics, metrics["pass@1_stderr"]
    who = args.model or (f"{args.api_model} at {args.base_url}" if args.base_url else "(given sampler)")
    print(f"{who} on {args.data}: {m['problems']} problems x {m['samples_per_problem']} samples, "
          f"T={args.temperature} top-p={args.top_p} max-new-tokens={args.max_new_tokens} seed={args.seed}"
          f"{' (with a --system message)' if args.system else ''}\n")
    print(f"{'id':<14} {'gold':>5} {'correct':>8}  votes")
    for pp in per_problem:
        votes = ", ".join(f"{a} x{n}" for a, n in pp["votes"].items())
        print(f"{pp['id']:<14} {pp['gold']:>5} {pp['correct']:>4}/{pp['samples']:<3}  {votes}")
    name = "greedy accuracy" if m["greedy_accuracy"] is not None else "pass@1"
    solved = sum(pp["correct"] for pp in per_problem)
    err = "" if se is None else f" ± {100 * se:.1f} s.e.  (95% CI {pct(m['pass@1_ci95'][0])} - {pct(m['pass@1_ci95'][1])})"
    print(f"\n{name:<18} {pct(m['pass@1'])}{err}   ({solved}/{m['problems'] * m['samples_per_problem']} correct)")
    for key in [k for k in m if re.fullmatch(r"(pass|maj)@\d+", k) and k not in ("pass@1", "maj@1")]:
        print(f"{key:<18} {pct(m[key])}")
    print(f"{'no answer':<18} {pct(m['no_answer_rate'])}")
    print(f"{'truncated':<18} {pct(m['truncation_rate'])}")
    print(f"{'tokens mean / max':<18} {m['mean_tokens']:.0f} / {m['max_tokens']}")
    if stats["tokens_per_s"]:
        print(f"{'tokens/s':<18} {stats['tokens_per_s']:.1f}  (this process, {stats['new_samples']} new samples)")


# ---- main ----

def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 conflict_handler="resolve")      # lets --seed below replace the shared one
    ap.add_argument("--data", required=True, help="problems JSONL: {id, problem, answer}")
    ap.add_argument("--model", help="local model folder (Hugging Face layout)")
    ap.add_argument("--samples", type=int, default=4, help="samples per problem, K (default 4)")
    ap.add_argument("--raw-prompt", action="store_true", help="no chat template (base models)")
    ap.add_argument("--system", help="a system message before each problem, e.g. a teacher's prompt from its "
                    "distill.py run.json, to score it exactly as it was prompted (default: none, as users prompt)")
    ap.add_argument("--limit", type=int, help="score only the first N problems")
    ap.add_argument("--out", help="per-sample JSONL; also writes <out>.config.json and <out>.summary.json")
    ap.add_argument("--shard", help="i/N: score every N-th problem from the i-th (under torchrun: RANK/WORLD_SIZE)")
    # the flags every sampling script shares, with the DeepSeek-R1 protocol as defaults
    sample.add_sampling_args(ap, temperature=0.6, top_p=0.95, max_new_tokens=32768)
    ap.add_argument("--seed", type=int, default=0, help="base seed: sample k of problem i gets a seed hashed "
                    "from (seed, i, k), the same whatever K, --limit or sharding")
    return ap


def build_sampler(args, world):
    if world > 1 and "LOCAL_RANK" in os.environ:
        import torch                          # one GPU per rank: "cuda" / "auto" then means this rank's GPU
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return sample.make_sampler(model=args.model, base_url=args.base_url, api_model=args.api_model,
                               device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                               concurrency=args.concurrency, api_key_env=args.api_key_env, timeout=args.timeout,
                               compile=args.compile)


def gather(out, done, needed, rank, world, wait_for_others):
    """All records once every needed (id, sample) is in, or None when this process does not merge."""
    while rank == 0 and wait_for_others and any(key not in done for key in needed):
        time.sleep(2)                         # torchrun: the other ranks are still sampling
        done = load_records(out)
    if world > 1 and wait_for_others and rank != 0:
        return None                           # torchrun: rank 0 merges
    missing = sum(key not in done for key in needed)
    if missing:
        print(f"shard {rank}/{world} done; {missing} samples of other shards still missing. The last "
              f"shard to finish (or a rerun without --shard) merges them.", file=sys.stderr)
        return None
    return done


def main(argv=None, sampler=None):
    """Score, print the report, write the files; returns the summary (None on a rank that does not merge).
    `sampler` replaces the one built from --model / --base-url (tests pass a fake)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if sampler is None and not args.model and not (args.base_url and args.api_model):
        ap.error("give --model DIR, or --base-url URL and --api-model NAME")
    if args.samples < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("need --samples >= 1, --temperature >= 0, 0 < --top-p <= 1")
    if args.system and args.raw_prompt:
        ap.error("--system needs the chat template: drop --raw-prompt")
    if args.temperature == 0 and args.samples > 1 and args.model:
        print("eval_aime.py: --temperature 0 is greedy: a local model gives K identical samples; "
              "greedy scoring is --temperature 0 --samples 1", file=sys.stderr)
    try:
        every = load_problems(args.data)
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval_aime.py: {e}")
    problems = every[:args.limit] if args.limit else every
    rank, world, wait_for_others = shard_of(args.shard)
    if world > 1 and not args.out:
        ap.error("sharding needs --out: the ranks meet in its files")
    out = Path(args.out) if args.out else None
    params = sample.sampling_params(args)
    config = run_config(args, params)
    own = shard_file(out, rank, world) if out else None
    done = {}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        check_config(out, config)
        try:
            done = load_records(out, own)
        except ValueError as e:
            raise SystemExit(f"eval_aime.py: {e}")
    mine = problems[rank::world]
    todo = [(p, k) for p in mine for k in range(args.samples) if (p["id"], k) not in done]

    sampler = sampler or build_sampler(args, world)
    total = len(mine) * args.samples
    desc = "eval" if world == 1 else f"eval shard {rank}/{world}"
    with tqdm(total=total, initial=total - len(todo), unit="sample", desc=desc) as bar:
        stats = draw(sampler, todo, params, args, own, done, bar)

    if out:
        done = gather(out, done, [(p["id"], k) for p in problems for k in range(args.samples)],
                      rank, world, wait_for_others)
        if done is None:
            return None
        merge(out, done, every)               # also re-extracts the answers in `done`

    metrics, per_problem = summarize(problems, done, args.samples, greedy=args.temperature == 0)
    summary = {"metrics": metrics, "per_problem": per_problem, "config": config,
               "settings": {"samples": args.samples, "limit": args.limit, "shards": world,
                            "batch_size": args.batch_size, "concurrency": args.concurrency},
               "sampler": sampler.describe(), "throughput": stats,
               "manifest": model.run_manifest(vars(args), [args.data], args.model)}
    if out:
        model.write_json_atomic(sidecar(out, "summary"), summary)
    report(metrics, per_problem, stats, args)
    return summary


if __name__ == "__main__":
    main()
