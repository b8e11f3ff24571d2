"""The paper's loop, end to end, offline, on the embedded default model: distill -> SFT -> score.

    python loop.py                    # ~5 minutes on 2 idle CPU cores; everything lands in runs/loop/
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
4. scores three rows on the held-out split with `eval_aime.py`, greedy and sampled, under one
   protocol: the base model as users prompt it, the teacher exactly as distill.py prompted it (its
   system message, model and sampling settings read back from the traces' run.json), and the
   fine-tuned student as users prompt it. It prints them as one table, whatever happened, and closes
   with student against teacher, with error bars, saying so when the difference is within them,
5. writes report.json (every number printed and drawn) and, if matplotlib is installed (optional),
   report.png: the three rows with their 95% intervals and the student's SFT loss curve.

Each step is the same command a user would type (printed before it runs), and each writes its own
manifest, so the final summary points back through the checkpoint and the traces to the teacher.
What it is not: a reproduction of the paper's numbers. That needs a 7B+ base, a strong teacher and a
GPU: see README.md, "Recipes".
"""
import importlib.util
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from eval_aime import mean_stderr
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
# The sampled protocol (DeepSeek-R1's): the teacher's chains are drawn with it, and all three rows are
# scored with it, so the teacher row's pass@1 estimates how often distillation accepts a chain.
TEMPERATURE, TOP_P = 0.6, 0.95


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
    printable = shlex.join(str(c) for c in cmd).replace(sys.executable, "python")
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


def teacher_setup(run_json):
    """How distill.py prompted the teacher, read back from its run.json (not from this file's constants):
    the model flags, the system message and every sampling setting."""
    manifest = json.loads(Path(run_json).read_text())
    config = manifest["config"]
    where = (["--base-url", config["teacher"], "--api-model", config["api_model"]] if config["api_model"]
             else ["--model", config["teacher"]])
    return {"where": where, "system": config["system"], "sampling": manifest["sampling"]}


def score(where, system, sampling, data, out, args, log, greedy):
    """One eval_aime.py run. sampling: the distillation's settings {"temperature", "top_p",
    "max_new_tokens", ...}, passed flag for flag; greedy keeps them but sets temperature 0."""
    settings = {**sampling, "temperature": 0} if greedy else sampling
    cmd = [sys.executable, "eval_aime.py", *where, "--data", data, "--out", out, "--device", args.device,
           "--seed", args.seed, "--samples", 1 if greedy else args.eval_samples]
    cmd += [x for key, value in settings.items() if value is not None for x in (f"--{key.replace('_', '-')}", value)]
    cmd += ["--system", system] if system else []
    run(cmd, log)
    return json.loads(Path(f"{out}.summary.json").read_text())


def score_rows(args, out, heldout, traces, student, log):
    """The three rows, greedy and sampled, under the protocol the teacher was sampled with."""
    teacher = teacher_setup(f"{traces}.run.json")
    rows = [("base", "base", "as users prompt it", ["--model", args.model], None),
            ("teacher", "teacher", "as distill.py prompted it", teacher["where"], teacher["system"]),
            ("student", "sft", "after SFT, as users prompt it", ["--model", student], None)]
    results = []
    for name, stem, how, where, system in rows:
        files = {kind: out / f"eval_{stem}_{kind}.jsonl" for kind in ("greedy", "sampled")}
        summaries = {kind: score(where, system, teacher["sampling"], heldout, path, args, log, greedy=kind == "greedy")
                     for kind, path in files.items()}
        results.append({"name": name, "how": how, **summaries,
                        "files": {kind: f"{path}.summary.json" for kind, path in files.items()}})
    return results


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
    out, started, load_at_start = Path(args.out), time.perf_counter(), os.getloadavg()[0]
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
         "--samples-per-problem", args.samples_per_problem, "--max-tokens", args.max_tokens, "--temperature", TEMPERATURE,
         "--top-p", TOP_P, "--seed", args.seed, "--device", args.device, "--plain-ok", "--system", TEACHER_SYSTEM], log)
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

    # 4. three rows under one protocol on the held-out split, greedy and sampled
    rows = score_rows(args, out, heldout, traces, student, log)
    seconds = time.perf_counter() - started

    # 5. report.json and the picture drawn from it
    report, picture = write_report(out, rows, student / "metrics.jsonl", heldout, seconds, load_at_start, log)
    print_report(report)
    print(f"\nreport: {out / 'report.json'}; picture: {picture}")
    print(f"audit trail: {out}/eval_sft_sampled.jsonl.summary.json -> sft/run.json -> traces.jsonl.run.json -> teacher")
    print(f"\n{report['student_vs_teacher']['sentence']}")


def paired(a, b):
    """Per-problem difference a - b of two runs on the same problems (fraction of samples correct):
    its mean, its standard error, and whether the mean is within two standard errors of zero."""
    other = {pp["id"]: pp["correct"] / pp["samples"] for pp in b["per_problem"]}
    d, se = mean_stderr([pp["correct"] / pp["samples"] - other[pp["id"]] for pp in a["per_problem"]])
    return {"difference": d, "stderr": se, "within_2se": se is None or abs(d) <= 2 * se}


def machine():
    """What the numbers were measured on: CPU model, cores, memory (and a GPU, if any)."""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}"


def build_report(rows, metrics_path, heldout, seconds, load_at_start):
    """Everything the table, the closing sentence and the picture show, taken from the eval summaries
    and the student's metrics.jsonl, with where each number came from."""
    def entry(summary, path):
        m = summary["metrics"]
        return {"value": m["pass@1"], "stderr": m["pass@1_stderr"], "ci95": m["pass@1_ci95"], "summary": path}
    k = rows[0]["sampled"]["metrics"]["samples_per_problem"]
    out_rows = []
    for r in rows:
        m = r["sampled"]["metrics"]
        out_rows.append({"name": r["name"], "how": r["how"], "model": r["sampled"]["config"]["model"]
                         or r["sampled"]["config"]["base_url"], "system": r["sampled"]["config"].get("system"),
                         "greedy": entry(r["greedy"], r["files"]["greedy"]),
                         "pass@1": entry(r["sampled"], r["files"]["sampled"]),
                         f"maj@{k}": m[f"maj@{k}"], "no_answer_rate": m["no_answer_rate"],
                         "truncation_rate": m["truncation_rate"]})
    by = {r["name"]: r for r in rows}
    versus = {"greedy": paired(by["student"]["greedy"], by["teacher"]["greedy"]),
              "pass@1": paired(by["student"]["sampled"], by["teacher"]["sampled"])}
    config = rows[0]["sampled"]["config"]
    problems = rows[0]["sampled"]["metrics"]["problems"]
    versus["sentence"] = closing_sentence({r["name"]: r for r in out_rows}, versus, problems)
    device = rows[0]["sampled"]["manifest"]["device"]
    steps = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    date = time.strftime("%Y-%m-%d")
    where = machine() + ("" if device == "cpu" else f", {device}")
    protocol = {"samples": k, **{key: config[key] for key in ("temperature", "top_p", "top_k", "min_p", "max_new_tokens",
                                                              "max_think_tokens", "min_think_tokens")}}
    return {
        "title": f"python loop.py, {date}, {where}: {problems} held-out problems, greedy and K={k} samples at "
                 f"T={config['temperature']} top-p {config['top_p']}, {config['max_new_tokens']} new tokens",
        "date": date, "machine": where, "minutes": round(seconds / 60, 2),
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "heldout": {"file": str(heldout), "problems": problems}, "protocol": protocol,
        "rows": out_rows,
        "student_vs_base": {"pass@1": paired(by["student"]["sampled"], by["base"]["sampled"])},
        "student_vs_teacher": versus,
        "sft_loss": {"metrics": str(metrics_path), "step": [s["step"] for s in steps if "loss" in s],
                     "loss": [s["loss"] for s in steps if "loss" in s]},
    }


def closing_sentence(rows, versus, problems):
    """Student against teacher, in points with one standard error of the paired difference; plain
    about whether the difference is within two of them."""
    student, teacher = rows["student"], rows["teacher"]
    parts = [f"{metric} {student[metric]['value']:.1%} vs {teacher[metric]['value']:.1%} "
             f"({100 * versus[metric]['difference']:+.1f} ± {100 * (versus[metric]['stderr'] or 0):.1f} points)"
             for metric in ("greedy", "pass@1")]
    text = (f"Student vs teacher on the same {problems} held-out problems: {parts[0]}, {parts[1]}; ± is one standard error "
            f"of the per-problem difference. ")
    beyond = [m for m in ("greedy", "pass@1") if not versus[m]["within_2se"]]
    if not beyond:
        return text + "Both differences are within two standard errors: this run cannot tell the student from its teacher."
    said = [f"on {m} the student is {'ahead of' if versus[m]['difference'] > 0 else 'behind'} its teacher by more "
            f"than two standard errors" for m in beyond]
    said += [f"on {m} the difference is within two standard errors" for m in ("greedy", "pass@1") if m not in beyond]
    said = "; ".join(said)
    return text + said[0].upper() + said[1:] + "."


def print_report(report):
    k = report["protocol"]["samples"]
    print(f"\n{report['title']}")
    print(f"{'':40} {'greedy':>14} {f'pass@1 (K={k})':>14} {f'maj@{k}':>7} {'no answer':>10} {'truncated':>10}")
    for r in report["rows"]:
        cells = [f"{r[m]['value']:.1%} ± {r[m]['stderr'] or 0:.1%}" for m in ("greedy", "pass@1")]
        print(f"{r['name'] + ' (' + r['how'] + ')':40} {cells[0]:>14} {cells[1]:>14} {r[f'maj@{k}']:>7.1%} "
              f"{r['no_answer_rate']:>10.1%} {r['truncation_rate']:>10.1%}")
    print("(± one standard error across problems; no answer and truncated: share of the sampled answers)")
    base = next(r for r in report["rows"] if r["name"] == "base")["pass@1"]["value"]
    student = next(r for r in report["rows"] if r["name"] == "student")["pass@1"]["value"]
    up = report["student_vs_base"]["pass@1"]
    verdict = ("did not move beyond two standard errors" if up["within_2se"] else
               "improved" if up["difference"] > 0 else "got worse")
    load = report["load_average"]
    print(f"\nAfter SFT, pass@1 {verdict} ({base:.1%} -> {student:.1%}). Total time {report['minutes']:.1f} min "
          f"(load average {load['start']:.1f} at the start, {load['end']:.1f} at the end).")


def write_report(out, rows, metrics_path, heldout, seconds, load_at_start, log):
    """report.json, holding every number printed and drawn, then report.png drawn from it alone.
    Returns the report and the picture's path (or a line on how to get it)."""
    report = build_report(rows, metrics_path, heldout, seconds, load_at_start)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report, draw(out, log)


def draw(out, log):
    """report.png beside report.json, by the command a user would type; matplotlib is optional."""
    picture = out / "report.png"
    if importlib.util.find_spec("matplotlib") is None:
        return (f"not drawn: matplotlib is not installed (optional; `pip install matplotlib`, or "
                f"`bash setup.sh test`), then `python tools/plot.py {out} --out {picture}`")
    run([sys.executable, "tools/plot.py", out, "--out", picture], log)
    return picture


if __name__ == "__main__":
    cli(main)
