"""The loop's audit trail: from a score's summary, follow sha256s back through the checkpoint and the
traces to the teacher and its problems. The problem generator of loop.py. Its three rows, on a tiny
random model: the teacher scored exactly as distill.py prompted it (from the manifests), report.json
equal to the eval summaries and metrics.jsonl, report.png a real picture; and the closing sentence.

    python -m pytest tests/test_loop.py -q
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import distill
import eval_aime
import loop
from conftest import REPO, make_hf_model
from model import sha256_file
from openai_server import OpenAIServer


def test_problem_generator_is_seeded_with_integer_answers_and_distinct_problems():
    a, b = loop.make_problems(60, seed=3), loop.make_problems(60, seed=3)
    assert a == b and a != loop.make_problems(60, seed=4)
    assert len({p["problem"] for p in a}) == 60 and len({p["id"] for p in a}) == 60
    assert all(str(int(p["answer"])) == p["answer"] for p in a)


def test_manifests_link_score_to_checkpoint_to_traces_to_teacher(tmp_path, smollm2):
    problems = tmp_path / "problems.jsonl"
    loop.write_jsonl(problems, [{"id": "p1", "problem": "What is 7*8?", "answer": "56"},
                                {"id": "p2", "problem": "What is 3+4?", "answer": "7"}])
    traces = tmp_path / "traces.jsonl"
    with OpenAIServer() as server:  # the teacher: an endpoint that reasons in <think> and boxes the answer
        distill.main(["--problems", str(problems), "--teacher", server.base_url, "--api-model", "teacher-model",
                      "--out", str(traces), "--samples-per-problem", "2", "--max-tokens", "64"])
    assert len(traces.read_text().splitlines()) == 4
    base = make_hf_model(tmp_path / "base", n_head=2, n_kv=1, head_dim=16, tokenizer_from=smollm2)
    student = tmp_path / "sft"
    subprocess.run([sys.executable, str(REPO / "sft.py"), "--data", str(traces), "--model", str(base),
                    "--out", str(student), "--max-steps", "2", "--device", "cpu", "--max-len", "256"],
                   check=True, capture_output=True)
    out = tmp_path / "eval.jsonl"
    eval_aime.main(["--model", str(student), "--data", str(problems), "--out", str(out), "--temperature", "0",
                    "--samples", "1", "--max-new-tokens", "4", "--device", "cpu"])

    # score -> checkpoint: the summary embeds the model folder's run.json
    summary = json.loads((tmp_path / "eval.jsonl.summary.json").read_text())
    assert summary["manifest"]["inputs"][0]["sha256"] == sha256_file(problems)
    checkpoint = summary["manifest"]["model"]
    assert checkpoint["path"] == str(student.resolve())
    # checkpoint -> traces: sft's manifest names the traces file by sha256 (the file as it is now)
    trace_input = next(i for i in checkpoint["manifest"]["inputs"] if i["path"] == str(traces.resolve()))
    assert trace_input["sha256"] == sha256_file(traces) and trace_input["rows"] == 4
    assert checkpoint["manifest"]["model"]["path"] == str(base.resolve())
    # traces -> teacher: distill's run.json, embedded, names the teacher and the problems it was given
    teacher_run = trace_input["manifest"]
    assert teacher_run["teacher"]["base_url"] == server.base_url
    assert teacher_run["teacher"]["api_model"] == "teacher-model"
    assert teacher_run["manifest"]["inputs"][0]["sha256"] == sha256_file(problems)


# ---- the three rows and the report, on a tiny random model (a few seconds per step) ----

SYSTEM = "Answer with \\boxed{N}."


@pytest.fixture(scope="module")
def small_loop(tmp_path_factory, smollm2_tokenizer):
    """loop.py's steps 4 and 5 for real, on 2 held-out problems: a teacher distilled with its own system
    message and sampling settings (not loop.py's), a 3-step SFT student, six eval_aime.py runs."""
    d = tmp_path_factory.mktemp("loop")
    base = make_hf_model(d / "base", n_head=2, n_kv=1, head_dim=16, tokenizer_from=smollm2_tokenizer)
    problems = loop.make_problems(4, seed=1)
    train, heldout = d / "problems_train.jsonl", d / "problems_heldout.jsonl"
    loop.write_jsonl(train, problems[:2])
    loop.write_jsonl(heldout, problems[2:])
    traces = d / "traces.jsonl"
    distill.main(["--problems", str(train), "--teacher", str(base), "--out", str(traces), "--samples-per-problem", "1",
                  "--max-tokens", "4", "--temperature", "0.7", "--top-p", "0.9", "--system", SYSTEM, "--plain-ok",
                  "--device", "cpu"])
    chains = d / "chains.jsonl"          # a random teacher solves nothing: the student learns from these
    loop.write_jsonl(chains, [{**p, "thinking": "Count.", "solution": f"\\boxed{{{p['answer']}}}"} for p in problems[:2]])
    student = d / "sft"
    subprocess.run([sys.executable, str(REPO / "sft.py"), "--data", str(chains), "--model", str(base), "--out",
                    str(student), "--max-steps", "3", "--device", "cpu", "--max-len", "256", "--warmup-steps", "1"],
                   check=True, capture_output=True)
    args = argparse.Namespace(model=str(base), device="cpu", seed=0, eval_samples=2)
    rows = loop.score_rows(args, d, heldout, traces, student, d / "loop.log")
    report, picture = loop.write_report(d, rows, student / "metrics.jsonl", heldout, 60.0, 0.5, d / "loop.log")
    return d, report, picture


def read(path):
    return json.loads(Path(path).read_text())


def test_teacher_row_is_scored_as_distill_prompted_it_from_the_manifests(small_loop):
    d, report, _ = small_loop
    distilled = read(d / "traces.jsonl.run.json")
    sampling = distilled["sampling"]            # every setting the teacher's chains were drawn with
    assert (sampling["temperature"], sampling["top_p"]) == (0.7, 0.9) != (loop.TEMPERATURE, loop.TOP_P)
    for kind in ("greedy", "sampled"):
        config = read(d / f"eval_teacher_{kind}.jsonl.summary.json")["config"]
        assert config["system"] == distilled["config"]["system"] == SYSTEM
        assert config["model"] == distilled["config"]["teacher"]
        assert config["prompt_suffix"] == distilled["config"]["prompt_suffix"]
        assert config["seed"] == distilled["config"]["seed"]
        assert {k: config[k] for k in sampling} == ({**sampling, "temperature": 0} if kind == "greedy" else sampling)
        # base and student: the same protocol, prompted as users prompt them (no system message)
        for stem in ("base", "sft"):
            other = read(d / f"eval_{stem}_{kind}.jsonl.summary.json")["config"]
            assert other["system"] is None
            assert {k: other[k] for k in sampling} == {k: config[k] for k in sampling}
    assert next(r for r in report["rows"] if r["name"] == "teacher")["system"] == SYSTEM


def test_report_json_holds_the_eval_summaries_numbers_and_the_picture_opens(small_loop):
    d, report, picture = small_loop
    assert read(d / "report.json") == json.loads(json.dumps(report))
    assert [r["name"] for r in report["rows"]] == ["base", "teacher", "student"]
    for row, stem in zip(report["rows"], ("base", "teacher", "sft")):
        greedy = read(d / f"eval_{stem}_greedy.jsonl.summary.json")["metrics"]
        sampled = read(d / f"eval_{stem}_sampled.jsonl.summary.json")["metrics"]
        assert row["greedy"]["summary"] == str(d / f"eval_{stem}_greedy.jsonl.summary.json")
        assert (row["greedy"]["value"], row["greedy"]["stderr"], row["greedy"]["ci95"]) == \
            (greedy["greedy_accuracy"], greedy["pass@1_stderr"], greedy["pass@1_ci95"])
        assert (row["pass@1"]["value"], row["pass@1"]["stderr"], row["pass@1"]["ci95"]) == \
            (sampled["pass@1"], sampled["pass@1_stderr"], sampled["pass@1_ci95"])
        assert (row["maj@2"], row["no_answer_rate"], row["truncation_rate"]) == \
            (sampled["maj@2"], sampled["no_answer_rate"], sampled["truncation_rate"])
    steps = [json.loads(line) for line in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert report["sft_loss"]["step"] == [1, 2, 3]
    assert report["sft_loss"]["loss"] == [s["loss"] for s in steps if "loss" in s]
    assert report["protocol"]["samples"] == 2 and report["heldout"]["problems"] == 2

    # the picture: beside report.json, a real PNG of a readable size, not blank, drawn from report.json
    import matplotlib.image
    assert picture == d / "report.png" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size > 20_000
    pixels = matplotlib.image.imread(picture)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 1000 and pixels.std() > 0.05
    from tools import plot
    scores, curves, title = plot.load_run(d)
    assert scores == [(f"{r['name']}\n{r['how']}", label, r[m]["value"], r[m]["ci95"])
                      for r in report["rows"] for m, label in (("greedy", "greedy"), ("pass@1", "pass@1 (K=2)"))]
    assert curves == [("student SFT loss", report["sft_loss"]["step"], report["sft_loss"]["loss"])]
    assert title == report["title"] and "2 held-out problems" in title


def test_plot_draws_sft_and_eval_runs_and_refuses_other_files_in_one_line(small_loop, tmp_path):
    d, _, _ = small_loop
    from tools import plot
    scores, curves, _ = plot.load_run(d / "sft")
    loss = [json.loads(line)["loss"] for line in (d / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert scores == [] and curves == [("sft loss", [1, 2, 3], loss)]
    summary = read(d / "eval_teacher_sampled.jsonl.summary.json")["metrics"]
    assert plot.load_run(d / "eval_teacher_sampled.jsonl")[0] == \
        [("eval_teacher_sampled", "pass@1 (K=2)", summary["pass@1"], summary["pass@1_ci95"])]
    out = tmp_path / "runs.png"
    plot.main([str(d / "sft"), str(d / "eval_base_greedy.jsonl"), str(d / "eval_teacher_sampled.jsonl.summary.json"),
               "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"), str(d / "problems_train.jsonl")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "problems_train.jsonl" in bad.stderr and "Traceback" not in bad.stderr


def test_without_matplotlib_the_loop_says_how_to_get_the_picture(tmp_path, monkeypatch):
    real = loop.importlib.util.find_spec
    monkeypatch.setattr(loop.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    said = loop.draw(tmp_path, tmp_path / "loop.log")
    assert "pip install matplotlib" in said and f"tools/plot.py {tmp_path} --out {tmp_path / 'report.png'}" in said
    assert not (tmp_path / "report.png").exists()


def fake_summary(name, kind, i):
    """An eval summary whose every number is distinct per row and kind, so a swap shows."""
    value = 0.1 * i + (0.05 if kind == "greedy" else 0.0)
    m = {"problems": 3, "samples_per_problem": 1 if kind == "greedy" else 4,
         "greedy_accuracy": value if kind == "greedy" else None, "pass@1": value, "pass@1_stderr": 0.01 * i + 0.003,
         "pass@1_ci95": [value - 0.02, value + 0.02], "maj@4": value + 0.001, "no_answer_rate": value + 0.002,
         "truncation_rate": value + 0.004}
    config = {"model": f"/models/{name}", "base_url": None, "system": "S" if name == "teacher" else None,
              "temperature": 0 if kind == "greedy" else 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
              "max_new_tokens": 128, "max_think_tokens": None, "min_think_tokens": None}
    per_problem = [{"id": f"p{j}", "correct": (i + j) % 2, "samples": m["samples_per_problem"]} for j in range(3)]
    return {"metrics": m, "per_problem": per_problem, "config": config, "manifest": {"device": "cpu"}}


def test_report_takes_each_number_from_its_own_summary(tmp_path):
    rows = [{"name": name, "how": "how", "files": {kind: f"{name}_{kind}.summary.json" for kind in ("greedy", "sampled")},
             **{kind: fake_summary(name, kind, i) for kind in ("greedy", "sampled")}}
            for i, name in enumerate(("base", "teacher", "student"), 1)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "eval_loss": 2.0}\n{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.25}\n')
    report = loop.build_report(rows, metrics, tmp_path / "heldout.jsonl", 90.0, 1.5)
    for row, given in zip(report["rows"], rows):
        g, s = given["greedy"]["metrics"], given["sampled"]["metrics"]
        assert row["greedy"] == {"value": g["greedy_accuracy"], "stderr": g["pass@1_stderr"], "ci95": g["pass@1_ci95"],
                                 "summary": given["files"]["greedy"]}
        assert row["pass@1"] == {"value": s["pass@1"], "stderr": s["pass@1_stderr"], "ci95": s["pass@1_ci95"],
                                 "summary": given["files"]["sampled"]}
        assert (row["maj@4"], row["no_answer_rate"], row["truncation_rate"]) == \
            (s["maj@4"], s["no_answer_rate"], s["truncation_rate"])
        assert row["model"] == f"/models/{row['name']}" and row["system"] == given["sampled"]["config"]["system"]
    assert report["sft_loss"] == {"metrics": str(metrics), "step": [1, 2], "loss": [1.5, 1.25]}
    assert report["protocol"]["samples"] == 4 and report["protocol"]["temperature"] == 0.6
    assert report["minutes"] == 1.5 and report["heldout"]["problems"] == 3
    assert report["student_vs_teacher"]["pass@1"] == loop.paired(rows[2]["sampled"], rows[1]["sampled"])
    # what tools/plot.py draws from it: every bar and interval, and the loss curve
    (tmp_path / "report.json").write_text(json.dumps(report))
    from tools import plot
    scores, curves, title = plot.load_run(tmp_path)
    assert scores == [(f"{r['name']}\nhow", label, given[kind]["metrics"]["pass@1"], given[kind]["metrics"]["pass@1_ci95"])
                      for r, given in zip(report["rows"], rows)
                      for kind, label in (("greedy", "greedy"), ("sampled", "pass@1 (K=4)"))]
    assert curves == [("student SFT loss", [1, 2], [1.5, 1.25])] and title == report["title"]


# ---- the closing sentence: student against teacher, paired over problems ----

def runs(corrects, samples=4):
    return {"per_problem": [{"id": f"p{i}", "correct": c, "samples": samples} for i, c in enumerate(corrects)]}


def rows_for(student, teacher):
    return {"student": {"greedy": {"value": student[0]}, "pass@1": {"value": student[1]}},
            "teacher": {"greedy": {"value": teacher[0]}, "pass@1": {"value": teacher[1]}}}


def test_paired_difference_and_its_standard_error_by_hand():
    student, teacher = runs([4, 2, 0, 3]), runs([0, 2, 2, 3])
    diffs = [1.0, 0.0, -0.5, 0.0]
    got = loop.paired(student, teacher)
    assert got["difference"] == pytest.approx(statistics.mean(diffs))
    assert got["stderr"] == pytest.approx(statistics.stdev(diffs) / 2)
    assert got["within_2se"]
    near = loop.paired(runs([2, 1, 0, 0]), runs([0, 0, 0, 0]))     # 1.57 standard errors: still within two
    assert near["difference"] / near["stderr"] == pytest.approx(1.5667, abs=1e-4) and near["within_2se"]
    far = loop.paired(runs([4] * 10 + [3] * 10), runs([0] * 10 + [1] * 10))    # ahead on every problem
    assert far["difference"] == pytest.approx(0.75) and not far["within_2se"]


def test_closing_sentence_says_plainly_when_the_difference_is_within_the_error_bars():
    within = {"greedy": loop.paired(runs([1, 0, 1, 0], 1), runs([0, 1, 1, 0], 1)),
              "pass@1": loop.paired(runs([2, 1, 0, 0]), runs([0, 0, 0, 0]))}      # +18.8 ± 12.0 points
    text = loop.closing_sentence(rows_for((0.5, 0.1875), (0.5, 0.0)), within, 4)
    assert "4 held-out problems" in text and "greedy 50.0% vs 50.0% (+0.0" in text
    assert "pass@1 18.8% vs 0.0% (+18.8 ± 12.0 points)" in text
    assert text.endswith("Both differences are within two standard errors: this run cannot tell the student "
                         "from its teacher.")
    behind = {"greedy": within["greedy"], "pass@1": loop.paired(runs([0] * 10 + [1] * 10), runs([4] * 10 + [3] * 10))}
    text = loop.closing_sentence(rows_for((0.5, 0.125), (0.5, 0.875)), behind, 20)
    assert "On pass@1 the student is behind its teacher by more than two standard errors; " \
           "on greedy the difference is within two standard errors." in text
    assert "cannot tell" not in text
