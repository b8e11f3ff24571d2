"""Distill long chains of thought: problems -> teacher -> graded, decontaminated JSONL traces for sft.py.

    # a reasoning model behind any OpenAI-compatible endpoint (key from $OPENAI_API_KEY, or --api-key-env)
    python distill.py --problems aime_historical --teacher https://api.deepseek.com/v1 \\
        --api-model deepseek-reasoner --api-key-env DEEPSEEK_API_KEY --samples-per-problem 4 \\
        --decontaminate aime24 aime25 amc23 math500 --out runs/traces.jsonl
    # a local model folder as the teacher (batched decoding through sample.py)
    python distill.py --problems problems.jsonl --teacher checkpoints/MODEL --out runs/traces.jsonl
    # then
    python sft.py --data runs/traces.jsonl

The teacher gets the user turn that sft.py trains on and eval_aime.py scores with (the problem, then
"Please reason step by step, and put your final answer within \\boxed{}."). Each answer it returns is
split into thinking (the server's reasoning_content / reasoning field, else the text inside
<think>...</think>, also when only </think> appears because the template opened <think> in the prompt)
and solution (the rest), then graded by eval_aime.check_answer: the solution's last \\boxed{} against the
gold answer, as integers when the gold is one, else by math-verify's equivalence (fractions, radicals,
intervals, tuples, matrices, ...). Problem files and evaluation sets may be bundled names (aime24, math500).

Files, all next to --out:
  <out>                  accepted traces {"id", "problem", "answer", "thinking", "solution", ...}: what
                         `sft.py --data` reads; its assistant turn is
                         "<think>\\n{thinking}\\n</think>\\n\\n{solution}"
  <out>.rejected.jsonl   every other answer, with the filters it failed in "flags": paid for, so never dropped
  <out>.errors.jsonl     requests that failed for good (retries exhausted, or a 4xx that retrying cannot fix)
  <out>.run.json         the configuration, the teacher, the skipped problems, counts, and the run manifest
With --keep-all, <out> holds every answer (flags set, "accepted" false) and there is no rejected file.

Filters, each counted in the report: duplicate problems (same normalized text) and problems that
overlap a --decontaminate problem in word 8-grams (see contamination()) are never sent; answers cut
at --max-tokens (finish_reason "length"), with a <think> never closed, with no visible thinking,
without a boxed answer, or with a wrong one (rejection sampling) are rejected.

Crash safety and resume: every answer is appended as one line, flushed and fsync'd as it arrives.
Rerunning the same command repairs a line torn by a kill, skips every sample already in <out> or the
rejected file, and asks only for the rest: nothing is paid for twice, nothing paid for is lost (except
requests in flight at the moment of a kill). A truncated answer is not asked again unless --max-tokens
grows. A failed request is not "done": each rerun tries it once more (with the full retry policy).
Ctrl-C (or SIGTERM) stops sending and waits for the requests in flight; a second one aborts. The exit
status is 0 when every planned answer is saved (or --max-total-tokens stopped the run), else 1.

What it is not: a rate-limit scheduler (retries and Retry-After are sample.py's), or a cost estimator
(--max-total-tokens counts tokens, whatever they cost).
"""
import argparse, dataclasses, glob, hashlib, re, signal, sys, threading, time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import model
import sample
from eval_aime import check_answer, check_config, data_path, final_answer, load_problems, problem_rows, sample_seed
from model import PROMPT_SUFFIX, user_prompt
from sample import Completion, EndpointError, PromptTooLong, Request

NGRAM = 8        # contamination is measured in word 8-grams shared with an evaluation problem ...
MIN_OVERLAP = 0.0  # ... covering more than this fraction of the shorter problem's 8-grams: 0 = any shared 8-gram

# Filters in the order they are checked; a rejected answer lists every one it fails. Contaminated problems
# are only sent with --keep-all; a prompt too long for a local teacher's context is never sent.
FILTERS = {"contaminated": "overlaps a --decontaminate problem",
           "prompt_too_long": "prompt longer than the teacher's context",
           "truncated": "cut at --max-tokens (finish_reason length)", "unclosed_think": "<think> never closed",
           "no_thinking": "no visible thinking", "no_answer": "no boxed answer", "wrong": "wrong answer"}


# ---- problems: duplicates and contamination, decided before anything is paid for ----

def normalize(text):
    """Text as compared for duplicates and contamination: lowercase, LaTeX commands (\\frac, \\dfrac,
    \\left) removed, punctuation and math symbols turned into spaces, whitespace collapsed. Digits
    stay: they are what tells two otherwise identical problems apart."""
    return " ".join(re.sub(r"[\W_]+", " ", re.sub(r"\\[a-zA-Z]+", " ", text.lower())).split())


def ngrams(words, n=NGRAM):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def load_references(paths):
    """Evaluation sets -> ({8-gram: {"file:id", ...}}, {"file:id": its number of 8-grams},
    {normalized text: "file:id"}). Rows need only a problem text (problem / question) and read as
    eval_aime.problem_rows reads them; answers may be anything (MATH-500's are LaTeX)."""
    owners, sizes, texts = {}, {}, {}
    for path in paths:
        for _, pid, text, _ in problem_rows(path):
            where, words = f"{Path(path).name}:{pid}", normalize(text).split()
            texts.setdefault(" ".join(words), where)
            sizes[where] = len(ngrams(words))
            for g in ngrams(words):
                owners.setdefault(g, set()).add(where)
    return owners, sizes, texts


def contamination(text, references, min_overlap=MIN_OVERLAP):
    """{"matches": "file:id", "overlap", "ngram"} if the problem is an evaluation problem, else None.

    Contaminated, by default: it shares any word 8-gram with a reference problem (the usual rule, and
    the safe side: a false positive costs a training problem, a false negative a score). It is strict
    for competition problems, whose phrasing survives normalization ("where m and n are relatively
    prime positive integers find m n"): on aime_historical.jsonl against aime24/aime25/amc23/math500 it
    flags 343 of 919 problems, of which 9 are the same problem. --min-overlap 0.3 (shared 8-grams at
    least 30% of the shorter problem's) flags 15 there: those 9 (7 near-verbatim in MATH-500; the
    lowest, a MATH rewording, at 0.43) and 6 that share only phrasing. run.json lists every match with
    its overlap and one shared 8-gram, to audit.
    A problem shorter than 8 words has no 8-gram: it must equal a reference problem to match."""
    owners, sizes, texts = references
    text = normalize(text)
    grams = ngrams(text.split())
    if not grams:
        return {"matches": texts[text], "overlap": 1.0, "ngram": text} if text in texts else None
    for ref, n in Counter(ref for g in grams for ref in owners.get(g, ())).most_common():   # by 8-grams shared
        overlap = n / min(len(grams), sizes[ref])
        if overlap > min_overlap or (min_overlap > 0 and overlap >= min_overlap):
            ngram = next(" ".join(g) for g in grams if ref in owners.get(g, ()))
            return {"matches": ref, "overlap": round(overlap, 3), "ngram": ngram}
    return None


def screen(problems, references, min_overlap, keep_all):
    """-> (problems to send, each with "contaminated": None or the match; duplicates; contaminated).
    A contaminated problem is sent only with keep_all."""
    keep, duplicates, contaminated, seen = [], [], [], {}
    for p in problems:
        # first: the first problem with this text (ids are unique)
        if (first := seen.setdefault(normalize(p["problem"]), p["id"])) != p["id"]:
            duplicates.append({"id": p["id"], "duplicate_of": first})
            continue
        if hit := contamination(p["problem"], references, min_overlap):
            contaminated.append({"id": p["id"], **hit})
        if keep_all or not hit:
            keep.append({**p, "contaminated": hit and hit["matches"]})
    return keep, duplicates, contaminated


# ---- one teacher answer -> one trace row ----

def sample_id(problem, k):
    """Stable across runs, machines and problem-file order: hash of the problem text (whitespace
    collapsed) and the sample index. Resume and the crash tests key on it."""
    return hashlib.sha256(f"{' '.join(problem.split())}\n{k}".encode()).hexdigest()[:16]


def split_reasoning(c):
    """Completion -> (thinking, solution, where the thinking came from, whether it was closed)."""
    if c.reasoning and c.reasoning.strip():            # DeepSeek / vLLM / SGLang reasoning parsers
        return c.reasoning.strip(), c.text.strip(), "field", True
    text = c.opened + c.text                           # a local teacher's template may open <think> itself
    if "</think>" in text:                             # last one, as eval_aime.extract_answer reads it
        thinking, solution = text.rsplit("</think>", 1)   # (a server leaves out the <think> its template opened)
        return thinking.split("<think>", 1)[-1].strip(), solution.strip(), "tags", True
    if "<think>" in text:                              # stopped (or was cut) while still thinking
        return text.split("<think>", 1)[1].strip(), "", "tags", False
    return "", text.strip(), "none", True              # a plain answer, or o-series (reasoning hidden)


def seed_of(args, p, k):
    """The request seed of sample k of problem p (servers that take a seed reproduce the answer)."""
    return sample_seed(args.seed, sample_id(p["problem"], 0), k)


def make_record(p, k, seed, c, params, teacher, plain_ok=False):
    thinking, solution, source, closed = split_reasoning(c)
    # (thinking that never closed leaves no solution: an answer inside it is no answer)
    extracted, correct = final_answer(solution, p["answer"]), check_answer(solution, p["answer"])
    failed = {"contaminated": p["contaminated"], "truncated": c.finish_reason == "length", "unclosed_think": not closed,
              "no_thinking": closed and not thinking and not plain_ok, "no_answer": extracted is None,
              "wrong": extracted is not None and not correct}
    flags = ["prompt_too_long"] if c.finish_reason == "prompt_too_long" else [f for f in failed if failed[f]]
    details = c.usage.get("completion_tokens_details") or {}
    sampling = dict(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=seed)
    return {"id": sample_id(p["problem"], k), "problem_id": p["id"], "sample": k, "problem": p["problem"],
            "answer": p["answer"], "thinking": thinking, "solution": solution, "extracted": extracted,
            "correct": correct, "accepted": not flags, "flags": flags, "finish_reason": c.finish_reason,
            "num_tokens": c.num_tokens, "reasoning_tokens": details.get("reasoning_tokens"),
            # o-series bill for reasoning they never show: say so instead of passing off the answer as a chain
            "reasoning_visible": bool(thinking), "reasoning_source": source, "contaminated_by": p["contaminated"],
            "usage": c.usage, "teacher": teacher, "sampling": sampling}


# ---- files: append-only, one line per answer (model.append_record) ----

def tally(files, planned, max_tokens):
    """Read <out>, the rejected and the errors files, torn last lines cut off first (check_config has
    made sure they are ours) -> (counts, the ids of the planned samples still to ask for, the ids of the
    errors filed). A sample is done once an answer to it is saved, unless that answer was cut at a
    smaller --max-tokens than this run's. counts: the answers that count now (the latest per id, of the
    samples planned), and the tokens paid for every answer saved on this --out (what --max-total-tokens
    limits). The latest: when a truncated answer was asked again with a larger --max-tokens, the answer
    at the larger budget counts (the older one stays in its file, flagged truncated)."""
    with model.user_errors():
        records = [r for k in ("out", "rejected") for r in model.read_records(files[k], repair=True)]
        failed = {e["id"] for e in model.read_records(files["errors"], repair=True)}
    ids, latest = {sample_id(p["problem"], k) for p, k in planned}, {}
    done = {r["id"] for r in records if not ("truncated" in r["flags"] and r["sampling"]["max_tokens"] < max_tokens)}
    for r in sorted(records, key=lambda r: -r["sampling"]["max_tokens"]):   # stable: of equal ones, the first
        latest.setdefault(r["id"], r)
    rows = [r for i, r in latest.items() if i in ids]
    counts = {"answers": len(rows), "accepted": sum(r["accepted"] for r in rows),
              "rejected": sum(not r["accepted"] for r in rows), "tokens_paid": sum(r["num_tokens"] for r in records),
              "flags": {f: sum(f in r["flags"] for r in rows) for f in FILTERS},
              "reasoning_tokens": sum(r.get("reasoning_tokens") or 0 for r in records),
              "reasoning_hidden": sum(not r["reasoning_visible"] and bool(r.get("reasoning_tokens")) for r in rows)}
    return counts, ids - done, failed


def run_config(args):
    """What a trace depends on; a rerun with another value is refused. The decontamination sets by
    content: a resume without them would send and accept evaluation problems. Not here: --max-tokens
    (may grow: truncated answers are asked again), --samples-per-problem (may grow), the problems
    file (may change: samples are keyed by problem text), speed settings. args.model: a local teacher."""
    return {"teacher": str(Path(args.model).resolve()) if args.model else args.teacher,
            "api_model": None if args.model else args.api_model,
            "teacher_fingerprint": model.folder_fingerprint(args.model),  # retrained?
            "decontaminate": sorted(model.sha256_file(path) for path in args.decontaminate), "system": args.system,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "keep_all": args.keep_all,
            "plain_ok": args.plain_ok, "min_overlap": args.min_overlap, "prompt_suffix": PROMPT_SUFFIX,
            # only when set, so that runs made before these flags existed still resume
            **{k: getattr(args, k) for k in ("raw_prompt", "chat_template_kwargs", "top_k", "min_p")
               if getattr(args, k)},
            **{k: getattr(args, k) for k in ("max_think_tokens", "min_think_tokens") if getattr(args, k) is not None}}


# ---- the run ----

def build_parser():
    ap = model.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              conflict_handler="resolve")      # lets --seed below replace the shared one
    ap.add_argument("--problems", required=True, type=data_path, help="JSONL {id, problem, answer}, or a bundled name")
    ap.add_argument("--teacher", required=True, help="an OpenAI-compatible URL (http(s)://.../v1) or a model folder")
    ap.add_argument("--out", required=True, help="accepted traces; also <out>.rejected.jsonl, .errors.jsonl, .run.json")
    ap.add_argument("--samples-per-problem", type=model.number(1), default=1, help="answers per problem (default 1)")
    ap.add_argument("--decontaminate", nargs="+", default=[], type=data_path, metavar="FILE", help="evaluation sets "
                    "(files or bundled names: aime24 math500 ...): no problem sharing a word 8-gram with one is sent")
    ap.add_argument("--min-overlap", type=model.number(0, 1, float), default=MIN_OVERLAP, help="contamination: shared "
                    "8-grams must cover more than this fraction of the shorter problem's 8-grams (default 0: any)")
    ap.add_argument("--max-total-tokens", type=model.number(1), help="stop sending once the saved answers hold this "
                    "many completion tokens (all runs on this --out together); answers in flight are still saved")
    ap.add_argument("--system", help="a system message before each problem (o-series: folded into the user turn)")
    ap.add_argument("--raw-prompt", action="store_true", help="local teacher: send the user turn as plain text, "
                    "no chat template (base models; an endpoint always gets a chat message)")
    ap.add_argument("--keep-all", action="store_true", help="every answer to --out, with its flags (contaminated "
                    "problems sent too); sft.py refuses rows without thinking or solution (or skips them: --skip-bad)")
    ap.add_argument("--plain-ok", action="store_true", help="the teacher is not a reasoning model: accept answers "
                    "without thinking (the whole answer is the chain; sft.py then trains on the solution alone)")
    # the sampling flags sample.py and eval_aime.py share (--max-tokens is --max-new-tokens), less --base-url
    sample.add_sampling_args(ap, temperature=0.6, top_p=0.95, max_new_tokens=32768, timeout=1800.0, distill=True)
    ap.add_argument("--seed", type=int, default=0, help="base seed: sample k of a problem gets hash(seed, problem, k)")
    return ap


class Stop:
    """Why no more requests are sent: None, "budget" or "interrupted". As a signal handler: the first
    Ctrl-C / SIGTERM sends nothing more and saves the answers in flight; the second aborts."""
    reason = None

    def __call__(self, signum, frame):
        if self.reason == "interrupted":
            raise KeyboardInterrupt
        self.reason = "interrupted"
        print("\ndistill.py: stopping: saving the answers in flight (again to abort)", file=sys.stderr)


def distill(sampler, todo, params, args, files, old, planned, budget_left):
    """Ask the teacher for every (problem, k) in todo; write each answer as it arrives. old: the counts
    of the answers saved before this run (see tally); planned: how many answers the run plans in all."""
    stop, endpoint, new = Stop(), args.base_url is not None, Counter()
    teacher = {k: v for k, v in sampler.describe().items() if k != "manifest"}
    # an endpoint's answers in flight are paid for: worth the wait (and signals reach only the main thread)
    in_main = endpoint and threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    # made only as the sampler asks for them, so that a stop sends nothing more: the endpoint sampler
    # pulls the next request only when one of its `concurrency` slots frees up
    requests = (Request.user(user_prompt(p["problem"]), seed_of(args, p, k), args.raw_prompt, args.system)
                for p, k in todo if not stop.reason)
    # a local sampler takes them all at once (it batches them), an endpoint as it has room; errors="yield":
    # one failed request must not lose the others in flight
    try:
        with tqdm(total=planned, initial=planned - len(todo), unit="answer", desc="distill") as bar:
            for i, c in sampler.generate(requests, params, errors="yield"):
                p, k = todo[i]
                if isinstance(c, PromptTooLong):     # a local teacher's context: recorded, never asked again
                    c = Completion(text="", num_tokens=0, finish_reason="prompt_too_long")
                if isinstance(c, EndpointError):
                    error = {"id": sample_id(p["problem"], k), "problem_id": p["id"], "sample": k, "status": c.status,
                             "attempts": c.attempts, "error": sampler.scrub(str(c)),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    model.append_record(files["errors"], error)
                    new["errors"] += 1
                else:
                    r = make_record(p, k, seed_of(args, p, k), c, params, teacher, args.plain_ok)
                    model.append_record(files["out" if r["accepted"] or args.keep_all else "rejected"], r)
                    new.update({"accepted" if r["accepted"] else "rejected": 1, "tokens": c.num_tokens})
                    new["no_usage"] += c.num_tokens == 0
                    bar.update(1)
                    if new["tokens"] >= budget_left and not stop.reason:
                        stop.reason = "budget"
                        if not endpoint:
                            break                    # local rows in flight cost nothing but time
                bar.set_postfix(accepted=old["accepted"] + new["accepted"], rejected=old["rejected"] + new["rejected"],
                                errors=new["errors"], tokens=old["tokens_paid"] + new["tokens"], refresh=False)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return new, stop.reason


def report(summary, files):
    s, c, p, keep_all = summary, summary["counts"], summary["problems"], summary["config"]["keep_all"]
    print(f"\n{p['total']} problems in {p['file']}: {len(p['duplicates'])} duplicates and "
          f"{len(p['contaminated'])} contaminated {'flagged' if keep_all else 'not sent'}, "
          f"{p['sent']} x {s['samples_per_problem']} answers planned")
    print(f"{'answers saved':<46} {c['answers']:>8}")
    print(f"{'  accepted':<46} {c['accepted']:>8}   -> {files['out']}")
    print(f"{'  rejected':<46} {c['rejected']:>8}   -> {files['out' if keep_all else 'rejected']}")
    for name, why in FILTERS.items():
        print(f"{'    ' + why:<46} {c['flags'][name]:>8}")
    print(f"{'still failing (rerun to retry)':<46} {s['failing']:>8}   -> {files['errors']}")
    print(f"{'not asked yet':<46} {s['missing'] - s['failing']:>8}")
    print(f"{'completion tokens paid (of them reasoning)':<46} {c['tokens_paid']:>8}   ({c['reasoning_tokens']})")
    if c["reasoning_hidden"]:
        print(f"note: {c['reasoning_hidden']} answers came with reasoning tokens but no visible reasoning "
              "(o-series hide it): flagged no_thinking")
    if s["this_run"]["no_usage"]:
        print(f"note: the server reported no token usage for {s['this_run']['no_usage']} answers: "
              "--max-total-tokens cannot count them")
    if s["this_run"]["stopped"]:
        print(f"stopped early: {s['this_run']['stopped']}")


def main(argv=None):
    """Run, print the report, write <out>.run.json; returns the summary."""
    ap = build_parser()
    args = ap.parse_args(argv)
    endpoint = args.teacher.startswith(("http://", "https://"))
    if endpoint and not args.api_model:
        ap.error("an endpoint --teacher needs --api-model (the model name the server expects)")
    if not endpoint and not Path(args.teacher).is_dir():
        ap.error(f"--teacher {args.teacher!r} is neither an http(s):// URL nor a model folder")
    if args.raw_prompt and args.system:
        ap.error("--system needs the chat template: not with --raw-prompt")
    args.model, args.base_url = (None, args.teacher) if endpoint else (args.teacher, None)  # sampler_from_args's
    with model.output_lock(args.out):
        return run(args)


def run(args):
    """main() once --out is ours alone."""
    problems = load_problems(args.problems)
    references = load_references(args.decontaminate)     # (none: nothing is contaminated)
    keep, duplicates, contaminated = screen(problems, references, args.min_overlap, args.keep_all)
    planned = [(p, k) for p in keep for k in range(args.samples_per_problem)]

    files = {k: Path(f"{args.out}{suffix}") for k, suffix in   # see the module docstring
             (("out", ""), ("rejected", ".rejected.jsonl"), ("errors", ".errors.jsonl"), ("run", ".run.json"))}
    model.remove_leftovers(files["out"].parent, f".{glob.escape(files['run'].name)}.tmp-*")
    config = run_config(args)
    previous = check_config(files["run"], config, [files[k] for k in ("out", "rejected", "errors")],
                            "it is not a distill.py output", key="config")
    old, missing, _ = tally(files, planned, args.max_new_tokens)   # (also cuts a torn line off the errors file)
    budget_left = args.max_total_tokens - old["tokens_paid"] if args.max_total_tokens else float("inf")
    new, stopped = Counter(), ("budget" if budget_left <= 0 else None)    # spent by the earlier runs
    todo = [] if stopped else [(p, k) for p, k in planned if sample_id(p["problem"], k) in missing]

    params = sample.sampling_params(args)
    # a local teacher takes a while to load: only if needed
    sampler = sample.sampler_from_args(args) if todo else None
    summary = {"config": config, "samples_per_problem": args.samples_per_problem, "max_tokens": args.max_new_tokens,
               "max_total_tokens": args.max_total_tokens, "sampling": dataclasses.asdict(params),
               "teacher": sampler.describe() if sampler else previous.get("teacher"),
               "problems": {"file": args.problems, "total": len(problems), "sent": len(keep), "duplicates": duplicates,
                            "contaminated": contaminated, "decontaminate": args.decontaminate},
               "manifest": model.run_manifest(vars(args), [args.problems, *args.decontaminate], args.model),
               "runs": previous.get("runs", []) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None}]}
    model.write_json_atomic(files["run"], summary)    # before the first answer: traces always have a teacher

    started = time.time()
    if todo:
        with model.user_errors():                   # e.g. a folder without a chat template: one line
            new, stopped = distill(sampler, todo, params, args, files, old, len(planned), budget_left)

    counts, missing, failed = tally(files, planned, args.max_new_tokens)
    summary.update(counts=counts, missing=len(missing), failing=len(missing & failed))
    summary["this_run"] = {"new_answers": new["accepted"] + new["rejected"], "new_tokens": new["tokens"],
                           "errors": new["errors"], "no_usage": new["no_usage"], "stopped": stopped,
                           "seconds": round(time.time() - started, 3)}
    summary["runs"][-1].update(summary["this_run"], finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    model.write_json_atomic(files["run"], summary)
    report(summary, files)
    return summary


if __name__ == "__main__":
    summary = model.cli(main)
    # 0: every planned answer is saved, or the token budget ran out; 1: a rerun has work left
    sys.exit(0 if summary["missing"] == 0 or summary["this_run"]["stopped"] == "budget" else 1)
