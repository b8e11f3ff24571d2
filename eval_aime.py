"""Score a model on math problems: problems -> samples -> graded final answers -> metrics.

    # sampled, DeepSeek-R1 protocol (T=0.6, top-p 0.95, up to 32,768 new tokens), 4 samples per problem
    python eval_aime.py --model DIR --data aime24 --out runs/aime24.jsonl
    # greedy: one noisy draw; MATH-500 also reports accuracy by level and by subject
    python eval_aime.py --model DIR --data math500 --temperature 0 --samples 1 --out runs/math500.jsonl
    # any OpenAI-compatible endpoint (key from $OPENAI_API_KEY, or --api-key-env NAME)
    python eval_aime.py --base-url http://127.0.0.1:8000/v1 --api-model NAME --data ... --out ...
    # one process per GPU; rank 0 merges
    torchrun --nproc_per_node 8 eval_aime.py --model DIR --data ... --out runs/aime24.jsonl

--data takes a bundled set by name (aime24, aime25, amc23, math500, aime_historical: data/NAME.jsonl)
or any JSONL path. Writes one JSON line per sample to --out as it arrives, `<out>.config.json` (what
the samples depend on: rerunning with the same --out resumes, a different configuration is refused)
and `<out>.summary.json` (every metric, the configuration and the run manifest: this file is the run's
run.json). Raising --samples on the same --out reuses the samples already drawn: sample k of a problem
has its own seed, whatever K is.

Grading (check_answer, also what distill.py keeps traces by): the final answer is the last complete
\\boxed{} after the reasoning; an integer gold answer is compared as an integer, any other by
math-verify's equivalence. There is no "last number in the text" fallback.
"""
import argparse, contextlib, dataclasses, functools, glob, hashlib, json
import math, os, re, select, subprocess, sys, threading, time
from pathlib import Path

import torch
from tqdm import tqdm

import model
import sample
from model import PROMPT_SUFFIX, UserError, user_prompt  # the user turn (defined in model.py)


# ---- answer extraction ----

_LAST_BOX = re.compile(r".*\\(?:boxed|fbox)(?![A-Za-z])\s*", re.S)   # everything up to the last box's content
# \text{33} -> 33, but \text{ minutes} (no digit: a unit or a word) -> removed
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mathbf|mbox|boldsymbol)\s*\{([^{}]*)\}")
# degrees, percent, dollars, LaTeX spacing (\! \, \; \: "\ "), ties and whitespace carry no value
_NOISE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|\\%|%|\\\$|\$|\\[!,;: ]|~|\s")


def last_box(text):
    """Content of the last \\boxed{...} / \\fbox{...} (or `\\boxed 5`); None if the last one is unclosed."""
    rest = text[box.end():] if (box := _LAST_BOX.match(text)) else ""
    if not rest.startswith("{"):               # `\boxed 204` as models write it (LaTeX would box "2")
        return re.match(r"[^\s$]*", rest).group(0) or None
    depth = 0
    for t in re.finditer(r"\\.|[{}]", rest, re.S):   # \{ and \} are literal braces, not grouping
        depth += {"{": 1, "}": -1}.get(t.group(), 0)
        if depth == 0:
            return rest[1:t.start()]
    return None                                # truncated mid-answer: no fallback to an earlier box


def parse_integer(s):
    """'033' -> 33, '\\text{33}' -> 33, '33^\\circ' -> 33, '25\\%' -> 25, 'm+n=33' -> 33, '1,000' -> 1000,
    '-1' -> -1, '33.0' -> 33. Fractions, lists ('3, 5'), expressions and bare words -> None."""
    s = s.replace("\u2212", "-").replace("{,}", ",")   # unicode minus; LaTeX's 1{,}000
    while (unwrapped := _WRAPPER.sub(lambda m: m.group(1) if re.search(r"\d", m.group(1)) else "", s)) != s:
        s = unwrapped
    s = _NOISE.sub("", s).rsplit("=", 1)[-1].rstrip(".")   # "m+n=33": the answer is what the box equates to
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    s = s.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", s) else s   # only thousands: "3,5" is a list
    m = re.fullmatch(r"([-+]?\d+)(\.0*)?", s)
    return int(m.group(1)) if m else None


def final_box(text):
    """Content of the last complete box after the reasoning, or None. Reasoning ends at the last
    </think>; a <think> that never closes means the model stopped while still thinking: no answer."""
    if not text or ("<think>" in text and "</think>" not in text):
        return None
    return last_box(text.rsplit("</think>", 1)[-1])


def extract_answer(text):
    """The integer in the last box after the reasoning, or None."""
    return None if (box := final_box(text)) is None else parse_integer(box)


def final_answer(text, gold):
    """What a sample answered, in the form it is graded in: the integer when the gold answer is one,
    else the boxed LaTeX; None when there is no such answer."""
    return extract_answer(text) if gold_integer(gold) is not None else (final_box(text) or "").strip() or None


def check_answer(text, gold):
    """The one grading rule of the project: is the final answer of `text` the gold answer?
    Integer gold: integer equality. Any other gold: math-verify equivalence of the boxed LaTeX."""
    answer, expected = final_answer(text, gold), gold_integer(gold)
    return answer == expected if expected is not None else answer is not None and equivalent(str(gold), answer)


# math-verify (what lighteval and open-r1 grade with) runs in a child process. Its own time limit is
# signal.alarm, which works only in a main thread and cannot stop a loop inside C code (a huge power,
# a factorial); a child that overruns GRADE_TIMEOUT or dies is killed instead, and the answer counts
# as wrong: odd LaTeX can cost a sample, never the run. It reads [gold, answer] lines, writes true/false
# (and math-verify's log goes to its stderr: /dev/null).
GRADE_TIMEOUT = 10.0
_GRADER = r'''
import json, sys
try:
    from math_verify import LatexExtractionConfig, parse, verify
except ImportError as e:
    print(f"cannot import math_verify ({e}): pip install -r requirements.txt", flush=True)
    sys.exit(1)
def read(latex):   # a box's content, parsed as math-verify parses a boxed answer
    return parse("\\boxed{" + latex + "}", [LatexExtractionConfig(boxed_match_priority=0)],
                 fallback_mode="no_fallback", extraction_mode="first_match", parsing_timeout=3)
verify(read("1"), read("1"))   # imports the parser before the first timed answer
print("ready", flush=True)
for line in sys.stdin:         # parse and verify catch their own errors (raise_on_error=False): true or false
    gold, answer = json.loads(line)
    print(json.dumps(verify(read(gold), read(answer), timeout_seconds=3)), flush=True)
'''


class _Grader:
    proc, lock = None, threading.Lock()        # the child, and one answer at a time

    def reply(self, timeout):
        """The child's next line, or None when it writes none within `timeout` seconds."""
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        return self.proc.stdout.readline().decode().strip() if ready else None

    def same(self, gold, answer):
        """One answer at a time, in a child started on first use and again after one was killed."""
        with self.lock:
            reply = None
            try:
                if self.proc is None:  # its own session: a Ctrl-C at the terminal must not kill it mid-answer
                    self.proc = subprocess.Popen([sys.executable, "-c", _GRADER], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                                 start_new_session=True)   # (distill.py saves answers in flight)
                    if (started := self.reply(120)) != "ready":
                        raise SystemExit(f"eval_aime.py: the math-verify grader did not start: {started or 'no reply'}")
                with contextlib.suppress(BrokenPipeError):   # it died: no reply
                    self.proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
                    reply = self.reply(GRADE_TIMEOUT)
            finally:
                if self.proc and reply not in ("true", "false"):  # overran, died or interrupted: start afresh
                    self.proc.kill()
                    self.proc.wait()
                    self.proc = None
            return reply == "true"


_grader = _Grader()


@functools.lru_cache(maxsize=1 << 16)
def equivalent(gold, answer):
    """Is the LaTeX `answer` mathematically the LaTeX `gold`? (math-verify; wrong when it cannot tell in time)"""
    return "".join(gold.split()) == "".join(answer.split()) or _grader.same(gold, answer)


# ---- metrics (pure) ----

def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k of the n samples is correct), c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote(answers, same):
    """Classes of answers that are the same (same(a, b)), None left out, as lists of indices: the
    largest first, a tie to the class whose first answer came first. The majority answer (maj@k) is
    the first of the first class."""
    classes = {}                               # index of a class's first answer -> the indices in the class
    for i in [i for i, a in enumerate(answers) if a is not None]:
        first = next((f for f in classes if same(answers[f], answers[i])), i)   # i: a class of its own
        classes.setdefault(first, []).append(i)
    return sorted(classes.values(), key=lambda c: (-len(c), c[0]))


def mean_stderr(values):
    """Mean and its standard error (sample std / sqrt(n)); the error is None for fewer than 2 values."""
    n, mean = len(values), sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None)


def ci95(mean, se):
    return None if se is None else [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)]


GROUPS = ("level", "subject")   # problem fields that get their own accuracy table


def same_answer(a, b):
    """Do two graded samples give the same answer? Two correct ones do, a correct and a wrong one do
    not (both decided by the gold answer, so the vote agrees with the grading); two wrong ones are
    compared as integers or, for a LaTeX gold, by equivalence."""
    if a["correct"] or b["correct"]:
        return a["correct"] and b["correct"]
    x, y = a["extracted"], b["extracted"]
    return x == y if isinstance(x, int) or isinstance(y, int) else equivalent(x, y)


def summarize(problems, records, samples, greedy=False):
    """Metrics over the first `samples` samples of each problem. records: {(id, k): record}."""
    per_problem, rows = [], []
    for p in problems:
        rs = [records[(p["id"], k)] for k in range(samples)]
        classes = vote([None if r["extracted"] is None else r for r in rs], same_answer)
        top = rs[classes[0][0]] if classes else {"extracted": None, "correct": False}
        votes = {str(rs[c[0]]["extracted"]): len(c) for c in classes}
        unanswered = sum(r["extracted"] is None for r in rs)
        per_problem.append({"id": p["id"], "gold": p["answer"], **{f: p[f] for f in GROUPS if f in p},
                            "correct": sum(r["correct"] for r in rs), "samples": samples,
                            "majority": top["extracted"], "majority_correct": bool(top["correct"]),
                            "votes": {**votes, "none": unanswered} if unanswered else votes})
        rows += rs
    pass1, se = mean_stderr([pp["correct"] / samples for pp in per_problem])
    n, maj = len(problems), f"maj@{samples}"
    metrics = {"problems": n, "samples_per_problem": samples, "greedy_accuracy": pass1 if greedy else None,
               "pass@1": pass1, "pass@1_stderr": se, "pass@1_ci95": ci95(pass1, se),
               **{f"pass@{k}": sum(pass_at_k(samples, pp["correct"], k) for pp in per_problem) / n
                  for k in (2 ** i for i in range(1, samples.bit_length()))},   # k = 2, 4, 8, ... up to K
               maj: sum(pp["majority_correct"] for pp in per_problem) / n,
               "no_answer_rate": sum(r["extracted"] is None for r in rows) / len(rows),
               "truncation_rate": sum(r["finish_reason"] == "length" for r in rows) / len(rows),
               "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
               "max_tokens": max(r["num_tokens"] for r in rows)}
    for field in GROUPS:                      # MATH-500's rows carry a level (1-5) and a subject
        for group in sorted({str(pp[field]) for pp in per_problem if field in pp}):
            ps = [pp for pp in per_problem if field in pp and str(pp[field]) == group]
            metrics.setdefault(f"by_{field}", {})[group] = {
                "problems": len(ps), "pass@1": sum(pp["correct"] for pp in ps) / len(ps) / samples,
                maj: sum(pp["majority_correct"] for pp in ps) / len(ps)}
    return metrics, per_problem


# ---- problems ----

def _first(row, keys):
    return next((row[k] for k in keys if k in row), None)


def gold_integer(v):
    """An answer field as an int ("033", 33, 33.0), else None."""
    if (isinstance(v, float) and v.is_integer()) or (isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+\s*", v)):
        return int(v)
    return v if type(v) is int else None      # not a bool (an int to isinstance)


def data_path(name):
    """A bundled set by name (aime24, math500, ...) is data/NAME.jsonl; anything else is a path."""
    bundled = Path(__file__).resolve().parent / "data" / f"{name}.jsonl"
    return str(bundled) if re.fullmatch(r"[\w-]+", name) and not Path(name).exists() and bundled.exists() else name


def problem_rows(path):
    """(line number, id, problem text, row) for each row of a JSONL problems file: the id is field id /
    ID / unique_id (else "line-N"), the text field problem / question / Problem / Question. A line that
    is not a JSON object with a problem text, an unreadable file and one that is not UTF-8 text are a
    UserError naming the file (and line). Also what distill.py reads its --decontaminate sets with."""
    with model.user_errors(path), open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = _first(row, ("problem", "question", "Problem", "Question")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{path}:{lineno}: no problem text (a JSON object with field problem / question)")
            pid = _first(row, ("id", "ID", "unique_id"))
            yield lineno, f"line-{lineno}" if pid is None else str(pid), text, row


def load_problems(path):
    """JSONL rows {"id", "problem", "answer"} (also ID / unique_id / question / Problem / Question /
    Answer; level and subject are kept). An integer answer ("033", 33) becomes an int, graded as one;
    any other is LaTeX, graded by equivalence. A row without an id gets "line-N". Any bad row is a
    UserError naming the file and line."""
    problems, seen = [], {}
    for lineno, pid, text, row in problem_rows(path):
        answer = gold_integer(raw := _first(row, ("answer", "Answer")))
        if answer is None and isinstance(raw, (str, float)):
            answer = str(raw).strip() or None   # LaTeX ("\\frac{14}{3}"), or a number that is not an integer
        if answer is None:
            raise UserError(f"{path}:{lineno}: no answer (a non-empty string or number in field answer), got {raw!r}")
        if (first := seen.setdefault(pid, lineno)) != lineno:
            raise UserError(f"{path}:{lineno}: duplicate id {pid!r} (first on line {first})")
        problems.append({"id": pid, "problem": text, "answer": answer, **{f: row[f] for f in GROUPS if f in row}})
    if not problems:
        raise UserError(f"{path}: no problems")
    return problems


def sample_seed(seed, pid, k):
    """A 31-bit seed for sample k of problem pid: stable across runs, shards and values of K."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}:{k}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# ---- the records file: append-only, resumable, one file per shard (<out>.shardIofN) ----

def record_files(out):
    """--out, then the shard files, not their output_lock files."""
    return [out] + sorted(p for p in out.parent.glob(glob.escape(out.name) + ".shard*of*") if p.suffix != ".lock")


def load_records(out, own=None):
    """{(id, sample): record} over the main file and all shard files; the first copy wins."""
    done = {}
    for path in record_files(out):
        for r in model.read_records(path, repair=path == own):
            done.setdefault((r["id"], r["sample"]), r)
    return done


def run_config(args, params):
    """Everything a sample depends on. Not here: --samples, --limit, --shard, batch size, concurrency,
    timeout (they choose which samples to draw or how fast, never what a sample is)."""
    return {"data_sha256": model.sha256_file(args.data), "model_fingerprint": model.folder_fingerprint(args.model),
            "model": str(Path(args.model).resolve()) if args.model else None, "base_url": args.base_url,
            "api_model": args.api_model, "prompt": "raw" if args.raw_prompt else "chat", "prompt_suffix": PROMPT_SUFFIX,
            **dataclasses.asdict(params), "seed": args.seed, "device": args.device, "dtype": args.dtype,
            # only when given, so that runs made before the flag existed still resume
            **({"chat_template_kwargs": args.chat_template_kwargs} if args.chat_template_kwargs else {}),
            "system": args.system}


def check_config(sidecar, config, outputs, unknown="cannot tell how those samples were made", key=None):
    """The sidecar's content ({} when there is none), checked before any output is read or repaired: a
    configuration other than the sidecar's (at `key` in it, else all of it) is refused, and so are outputs
    without a sidecar (unknown: why they are not ours to touch). Also distill.py's. The sidecar itself is
    written once the sampler is up, so that a mistyped --model or a missing GPU never blocks an --out."""
    if sidecar.exists():
        previous = json.loads(sidecar.read_text())
        model.refuse_changes(previous.get(key, {}) if key else previous, config, f"{outputs[0]} was made with a "
                             "different configuration ({}). Use another --out, or the same settings to resume.")
        return previous
    if found := [p for p in outputs if p.exists()]:
        raise UserError(f"{found[0]} exists but {sidecar} does not: {unknown}. Use another --out.")
    return {}


def merge(out, done, problems):
    """Rewrite --out as every record (also those outside this run's --limit / --samples), in data
    order, with answers re-graded by the current code; then drop the shard files. Atomic: a kill here
    leaves the old files, which resume reads again."""
    gold = {p["id"]: p["answer"] for p in problems}
    order = {pid: i for i, pid in enumerate(gold)}      # every record's id is here: config.json pins the data
    rows = sorted(done.values(), key=lambda r: (order[r["id"]], r["sample"]))
    for r in rows:
        r.update(extracted=final_answer(r["text"], gold[r["id"]]), correct=check_answer(r["text"], gold[r["id"]]))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    for p in record_files(out)[1:]:
        p.unlink(missing_ok=True)             # another shard may be merging the same records
        Path(f"{p}.lock").unlink(missing_ok=True)   # every shard is done: nobody needs its lock any more


# ---- sampling ----

def draw(sampler, todo, params, args, path, done, bar):
    """Sample every (problem, k) in todo; append each record to path as it arrives (model.append_record),
    so a kill loses only the samples in flight."""
    requests = [sample.Request.user(user_prompt(p["problem"]), sample_seed(args.seed, p["id"], k), args.raw_prompt,
                                    args.system) for p, k in todo]
    # An endpoint request that fails for good must not throw away the others in flight: collect it,
    # keep going, fail at the end. A rerun retries just the failed ones. A prompt too long for a
    # local model's context is recorded as a sample without an answer.
    start, tokens, failed, skipped = time.time(), 0, [], 0
    for i, c in sampler.generate(requests, params, errors="yield") if requests else ():
        p, k = todo[i]
        if isinstance(c, sample.PromptTooLong):
            skipped += 1
            c = sample.Completion(text="", num_tokens=0, finish_reason="prompt_too_long")
        elif isinstance(c, Exception):
            failed.append(f"{p['id']} sample {k}: {c}")
            continue
        r = {"id": p["id"], "sample": k, "seed": requests[i].seed, "gold": p["answer"],
             "extracted": final_answer(c.text, p["answer"]), "correct": check_answer(c.text, p["answer"]),
             **{f: getattr(c, f) for f in ("finish_reason", "num_tokens", "text", "reasoning", "usage")}}
        done[(p["id"], k)] = r
        if path:
            model.append_record(path, r)
        tokens += c.num_tokens
        bar.update(1)
    if skipped:
        print(f"eval_aime.py: {skipped} samples skipped: the prompt does not fit the model's context "
              "(recorded with finish_reason prompt_too_long, scored as wrong)", file=sys.stderr)
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
            raise UserError(f"--shard wants i/N with 0 <= i < N, got {arg!r}")
        return int(m.group(1)), int(m.group(2)), False
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (int(os.environ.get("RANK", 0)), world, True) if world > 1 else (0, 1, False)


# ---- report ----

def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(metrics, per_problem, stats, args):
    m, se, ci = metrics, metrics["pass@1_stderr"], metrics["pass@1_ci95"]
    who = args.model or (f"{args.api_model} at {args.base_url}" if args.base_url else "(given sampler)")
    print(f"{who} on {args.data}: {m['problems']} problems x {m['samples_per_problem']} samples, "
          f"T={args.temperature} top-p={args.top_p} max-new-tokens={args.max_new_tokens} seed={args.seed}"
          f"{' (with a --system message)' if args.system else ''}\n")
    wid, wgold = (max(least, *(len(str(pp[k])) for pp in per_problem)) for k, least in (("id", 14), ("gold", 5)))
    print(f"{'id':<{wid}} {'gold':>{wgold}} {'correct':>8}  votes")
    for pp in per_problem:
        votes = ", ".join(f"{a} x{n}" for a, n in pp["votes"].items())
        print(f"{pp['id']:<{wid}} {str(pp['gold']):>{wgold}} {pp['correct']:>4}/{pp['samples']:<3}  {votes}")
    name = "greedy accuracy" if m["greedy_accuracy"] is not None else "pass@1"
    err = "" if se is None else f" ± {100 * se:.1f} s.e.  (95% CI {pct(ci[0])} - {pct(ci[1])})"
    print(f"\n{name:<18} {pct(m['pass@1'])}{err}   "
          f"({sum(pp['correct'] for pp in per_problem)}/{m['problems'] * m['samples_per_problem']} correct)")
    rates = [(k, m[k]) for k in m if re.fullmatch(r"(pass|maj)@\d+", k) and k not in ("pass@1", "maj@1")]
    for key, rate in rates + [("no answer", m["no_answer_rate"]), ("truncated", m["truncation_rate"])]:
        print(f"{key:<18} {pct(rate)}")
    print(f"{'tokens mean / max':<18} {m['mean_tokens']:.0f} / {m['max_tokens']}")
    if stats["tokens_per_s"]:
        print(f"{'tokens/s':<18} {stats['tokens_per_s']:.1f}  (this process, {stats['new_samples']} new samples)")
    maj = f"maj@{m['samples_per_problem']}" if m["samples_per_problem"] > 1 else None
    for field in [f for f in GROUPS if f"by_{f}" in m]:
        print(f"\n{field:<24} {'problems':>8} {name:>16}" + (f" {maj:>8}" if maj else ""))
        for group, g in m[f"by_{field}"].items():
            print(f"{group:<24} {g['problems']:>8} {pct(g['pass@1']):>16}" + (f" {pct(g[maj]):>8}" if maj else ""))


# ---- main ----

def build_parser():
    ap = model.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              conflict_handler="resolve")      # lets --seed below replace the shared one
    ap.add_argument("--data", required=True, type=data_path, help="JSONL {id, problem, answer}, or a bundled name")
    ap.add_argument("--model", help="local model folder (Hugging Face layout)")
    ap.add_argument("--samples", type=model.number(1), default=4, help="samples per problem, K (default 4)")
    ap.add_argument("--raw-prompt", action="store_true", help="no chat template (base models)")
    ap.add_argument("--system", help="a system message before each problem, e.g. the one a distill.py run.json records")
    ap.add_argument("--limit", type=model.number(1), help="score only the first N problems")
    ap.add_argument("--out", type=Path, help="per-sample JSONL; also writes <out>.config.json and <out>.summary.json")
    ap.add_argument("--shard", help="i/N: score every N-th problem from the i-th (under torchrun: RANK/WORLD_SIZE)")
    # the flags every sampling script shares, with the DeepSeek-R1 protocol as defaults
    sample.add_sampling_args(ap, temperature=0.6, top_p=0.95, max_new_tokens=32768)
    ap.add_argument("--seed", type=int, default=0, help="base seed: sample k of problem i gets hash(seed, i, k)")
    return ap


def main(argv=None, sampler=None):
    """Score, print the report, write the files; returns the summary (None on a rank that does not merge).
    `sampler` replaces the one built from --model / --base-url (tests pass a fake)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if sampler is None and not args.model and not (args.base_url and args.api_model):
        ap.error("give --model DIR, or --base-url URL and --api-model NAME")
    if args.system and args.raw_prompt:
        ap.error("--system needs the chat template: drop --raw-prompt")
    if args.temperature == 0 and args.samples > 1 and args.model:
        print("eval_aime.py: --temperature 0 is greedy: a local model gives K identical samples; "
              "greedy scoring is --temperature 0 --samples 1", file=sys.stderr)
    every = load_problems(args.data)
    rank, world, wait_for_others = shard_of(args.shard)
    if world > 1 and not args.out:
        ap.error("sharding needs --out: the ranks meet in its files")
    out, problems, params = args.out, every[:args.limit], sample.sampling_params(args)
    config, done = run_config(args, params), {}
    own = out if world == 1 else Path(f"{out}.shard{rank}of{world}")   # this process's records file
    with model.output_lock(own) if out else contextlib.nullcontext():  # --out is ours alone from here
        # resume: the samples already drawn with this configuration
        if out:
            if world == 1:
                model.remove_leftovers(out.parent, *(f".{glob.escape(out.name)}{s}.tmp-*"
                                                     for s in ("", ".config.json", ".summary.json")))
            check_config(Path(f"{out}.config.json"), config, record_files(out))
            with model.user_errors():
                done = load_records(out, own)
        mine = problems[rank::world]
        todo = [(p, k) for p in mine for k in range(args.samples) if (p["id"], k) not in done]

        # sample what is missing
        if sampler is None and world > 1 and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # one GPU per rank: "cuda" / "auto" means this one
        sampler = sample.sampler_from_args(args) if sampler is None else sampler
        if out:                               # (the same config, when it was there: check_config compared them)
            model.write_json_atomic(Path(f"{out}.config.json"), config)
        total, desc = len(mine) * args.samples, ("eval" if world == 1 else f"eval shard {rank}/{world}")
        with tqdm(total=total, initial=total - len(todo), unit="sample", desc=desc) as bar:
            try:
                stats = draw(sampler, todo, params, args, own, done, bar)
            except ValueError as e:           # e.g. a folder without a chat template: use --raw-prompt
                raise SystemExit(f"eval_aime.py: {e}")

        # gather every shard's records, merge them into --out
        if out:
            if wait_for_others and rank != 0:
                return None                   # torchrun: rank 0 merges
            needed = [(p["id"], k) for p in problems for k in range(args.samples)]
            while wait_for_others and any(key not in done for key in needed):
                time.sleep(2)                 # torchrun: the other ranks are still sampling
                done = load_records(out)
            if missing := sum(key not in done for key in needed):
                print(f"shard {rank}/{world} done; {missing} samples of other shards still missing. The last "
                      f"shard to finish (or a rerun without --shard) merges them.", file=sys.stderr)
                return None
            merge(out, done, every)           # also re-grades the answers in `done`

        # summarize
        metrics, per_problem = summarize(problems, done, args.samples, greedy=args.temperature == 0)
        summary = {"metrics": metrics, "per_problem": per_problem, "config": config, "sampler": sampler.describe(),
                   "settings": {"samples": args.samples, "limit": args.limit, "shards": world,
                                "batch_size": args.batch_size, "concurrency": args.concurrency}, "throughput": stats,
                   "manifest": model.run_manifest(vars(args), [args.data], args.model)}
        if out:
            model.write_json_atomic(Path(f"{out}.summary.json"), summary)
        report(metrics, per_problem, stats, args)
        return summary


if __name__ == "__main__":
    model.cli(main)
