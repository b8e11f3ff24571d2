"""The paper's loop, end to end, offline, on the embedded default model: distill -> SFT -> score.

    python loop.py                    # ~10 minutes on 2 CPU cores; everything lands in runs/loop/
    python loop.py --out runs/try2 --train 96 --samples-per-problem 8 --epochs 2

Rerunning the same command resumes: every step picks up what is already in --out (a finished step
costs seconds). A rerun with other settings is refused by the first step they change, which says so.

1. makes a seeded problem set with integer answers (arithmetic and counting word problems), split
   into train and held-out,
2. distills chains from a teacher with `distill.py`, several samples per problem, keeping only chains
   whose boxed answer is correct (rejection sampling, as s1 / LIMO / Sky-T1 did). Offline there is
   no stronger model, so the teacher is the student itself (SmolLM2-135M-Instruct): this is
   rejection-sampling self-distillation (STaR), the smallest honest instance of the recipe. The
   teacher's system message demonstrates the answer format once (TEACHER_SYSTEM); the student is
   trained and scored without it, as a student never sees how its teacher was prompted,
3. fine-tunes the student on those chains with `sft.py`,
4. scores the base and the fine-tuned model on the held-out split with `eval_aime.py`, greedy and
   sampled, and prints the two side by side, whatever happened.

Each step is the same command a user would type (printed before it runs), and each writes its own
manifest, so the final summary points back through the checkpoint and the traces to the teacher.
What it is not: a reproduction of the paper's numbers. That needs a 7B+ base, a strong teacher and a
GPU: see README.md, "Recipes".
"""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from model import ArgumentParser, UserError, cli, number

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO / "checkpoints" / "smollm2-135m-instruct"

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Omar"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cookies", "stamps"]


# The teacher's system message: a one-shot demonstration of the answer format. The student is trained
# and scored without it, so what SFT must teach is to reason briefly and box the answer unprompted.
TEACHER_SYSTEM = ("Solve the problem step by step in a few short sentences, then give the final answer as \\boxed{N}.\n"
                  "Example. Problem: Sam has 3 pens and buys 4 more. How many pens does Sam have now?\n"
                  "Solution: Sam starts with 3 pens and buys 4 more, so he has 3 + 4 = 7 pens. "
                  "The final answer is \\boxed{7}.")


def make_problems(n, seed):
    """n distinct problems {id, problem, answer} with small integer answers, from word-problem
    templates (easy on purpose: a 135M model must get some right for rejection sampling to keep any)."""
    rng = random.Random(seed)
    templates = [
        lambda a, b, who, x: (f"{who} has {a} {x} and gets {b} more. How many {x} does {who} have now?", a + b),
        lambda a, b, who, x: (f"{who} had {a + b} {x} and gave away {b}. How many {x} are left?", a),
        lambda a, b, who, x: (f"What is {a} + {b}?", a + b),
        lambda a, b, who, x: (f"What is {a} times {b}?", a * b),
        lambda a, b, who, x: (f"A box holds {a} {x}. How many {x} are in {b} boxes?", a * b),
        lambda a, b, who, x: (f"There are {a + b} students in a class and {b} of them are absent. "
                              f"How many students are present?", a),
    ]
    rows, seen = [], set()
    while len(rows) < n:
        text, answer = rng.choice(templates)(rng.randint(1, 9), rng.randint(1, 9), rng.choice(NAMES), rng.choice(THINGS))
        if text not in seen:
            seen.add(text)
            rows.append({"id": f"gen-{seed}-{len(rows):03d}", "problem": text, "answer": str(answer)})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(cmd, log):
    """Run one step as a subprocess, echoing the command; its output goes to the terminal and log."""
    printable = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {printable}", flush=True)
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {printable}\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        f.write(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-12:]
    print("\n".join("    " + line for line in tail))
    if proc.returncode == 2:  # the step's own one-line reason is the last line above
        raise UserError(f"{cmd[1]} refused (its reason is printed above; all output in {log}). "
                        "To start over with other settings, use another --out or delete this one")
    if proc.returncode != 0:
        sys.exit(f"step failed (exit {proc.returncode}): see {log}")
    return time.perf_counter() - started


def score(model, data, out, args, log, greedy):
    cmd = [sys.executable, "eval_aime.py", "--model", model, "--data", data, "--out", out,
           "--max-new-tokens", args.max_tokens, "--device", args.device, "--seed", args.seed]
    cmd += ["--temperature", "0", "--samples", "1"] if greedy else ["--temperature", "0.6", "--top-p", "0.95",
                                                                    "--samples", args.eval_samples]
    run(cmd, log)
    return json.loads(Path(f"{out}.summary.json").read_text())


def main(argv=None):
    p = ArgumentParser(description="distill -> SFT -> score, offline, on the embedded default model")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="student (and teacher) model folder")
    p.add_argument("--out", default=str(REPO / "runs" / "loop"), help="folder for every artifact")
    p.add_argument("--train", type=number(1), default=40, help="training problems")
    p.add_argument("--heldout", type=number(1), default=20, help="held-out problems")
    p.add_argument("--samples-per-problem", type=number(1), default=4, help="teacher samples per training problem")
    p.add_argument("--max-tokens", type=number(1), default=128, help="new tokens per answer (teacher and eval)")
    p.add_argument("--eval-samples", type=number(1), default=4, help="K for sampled scoring")
    p.add_argument("--epochs", type=number(1), default=2)
    p.add_argument("--lr", type=number(0, kind=float, above=True), default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    out, started = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "loop.log"
    print(f"everything goes to {out}/ (full output of each step: {log})")

    # 1. problems: disjoint templates draws, seeded, train and held-out
    problems = make_problems(args.train + args.heldout, args.seed)
    train, heldout = out / "problems_train.jsonl", out / "problems_heldout.jsonl"
    write_jsonl(train, problems[:args.train])
    write_jsonl(heldout, problems[args.train:])
    print(f"1. problems: {args.train} train -> {train.name}, {args.heldout} held-out -> {heldout.name}")

    # 2. teacher chains, correct ones only
    traces = out / "traces.jsonl"
    run([sys.executable, "distill.py", "--problems", train, "--teacher", args.model, "--out", traces,
         "--samples-per-problem", args.samples_per_problem, "--max-tokens", args.max_tokens, "--temperature", "0.8",
         "--top-p", "0.95", "--seed", args.seed, "--device", args.device, "--plain-ok", "--system", TEACHER_SYSTEM], log)
    n_traces = sum(1 for line in traces.read_text().splitlines() if line.strip()) if traces.exists() else 0
    print(f"2. distill: {n_traces} correct chains kept in {traces.name}")
    if n_traces == 0:
        raise UserError("the teacher solved no training problem: nothing to fine-tune on "
                        "(try another --out with --samples-per-problem 8)")

    # 3. fine-tune the student
    student = out / "sft"   # --resume: a rerun continues a killed run, and a finished one is left as it is
    run([sys.executable, "sft.py", "--data", traces, "--model", args.model, "--out", student, "--epochs", args.epochs,
         "--lr", args.lr, "--seed", args.seed, "--device", args.device, "--max-len", 1024, "--warmup-steps", 2,
         "--resume"], log)

    # 4. score before and after, greedy and sampled, on the held-out split
    results = {}
    for name, model in (("base", args.model), ("sft", student)):
        results[name] = (score(model, heldout, out / f"eval_{name}_greedy.jsonl", args, log, greedy=True),
                         score(model, heldout, out / f"eval_{name}_sampled.jsonl", args, log, greedy=False))
    report(results, args, time.perf_counter() - started, out)


def report(results, args, seconds, out):
    def m(summary, key):
        return summary["metrics"].get(key)
    rows = [("greedy accuracy", lambda g, s: f"{m(g, 'greedy_accuracy'):.1%}"),
            (f"pass@1 (K={args.eval_samples}, T=0.6)", lambda g, s: f"{m(s, 'pass@1'):.1%} ± {m(s, 'pass@1_stderr') or 0:.1%}"),
            (f"maj@{args.eval_samples}", lambda g, s: f"{m(s, f'maj@{args.eval_samples}'):.1%}"),
            ("no boxed answer (sampled)", lambda g, s: f"{m(s, 'no_answer_rate'):.1%}"),
            ("truncated (sampled)", lambda g, s: f"{m(s, 'truncation_rate'):.1%}")]
    print(f"\nheld-out: {args.heldout} problems; base = {Path(args.model).name}, sft = {out / 'sft'}")
    print(f"{'':30} {'base':>16} {'sft':>16}")
    for label, fmt in rows:
        print(f"{label:30} {fmt(*results['base']):>16} {fmt(*results['sft']):>16}")
    before, after = m(results["base"][1], "pass@1"), m(results["sft"][1], "pass@1")
    se = max(m(results["base"][1], "pass@1_stderr") or 0, m(results["sft"][1], "pass@1_stderr") or 0)
    verdict = ("improved" if after - before > 2 * se else "got worse" if before - after > 2 * se
               else "did not move beyond two standard errors")
    print(f"\npass@1 {verdict} ({before:.1%} -> {after:.1%}). Total time {seconds / 60:.1f} min.")
    print(f"audit trail: {out}/eval_sft_sampled.jsonl.summary.json -> sft/run.json -> traces.jsonl.run.json -> teacher")


if __name__ == "__main__":
    cli(main)
