"""distill.py against a loopback OpenAI-compatible server that misbehaves on purpose (429, 500, 503, a
hang, a dropped connection, a 400, a truncated answer, reasoning in reasoning_content / <think> / not
at all), o-series handling, SIGKILL at random points and resume, decontamination against the real
AIME 2024 file, duplicates, the token budget, --keep-all, and the embedded SmolLM2 as a local teacher;
the output is read back by sft.py's own loader.

    .venv/bin/python -m pytest tests/test_distill.py -q
"""
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distill
from distill import sample_id
from openai_server import OpenAIServer, default_responder, reply, user_text
from sample import Completion

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789-DO-NOT-LEAK"


def write_problems(path, rows):
    path.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, p, a in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(tmp_path, problems, teacher, *extra, out="traces.jsonl"):
    argv = ["--problems", str(problems), "--teacher", teacher, "--out", str(tmp_path / out), *extra]
    if teacher.startswith("http"):
        argv += ["--api-model", "test-model"]
    return distill.main(argv)


def files(tmp_path, out="traces.jsonl"):
    o = tmp_path / out
    return read_jsonl(o), read_jsonl(Path(f"{o}.rejected.jsonl")), read_jsonl(Path(f"{o}.errors.jsonl"))


# ---- splitting an answer into thinking and solution ----

@pytest.mark.parametrize("text, reasoning, expected", [
    ("<think>\nA\n</think>\n\nSo \\boxed{1}", None, ("A", "So \\boxed{1}", "tags", True)),
    ("A\n</think>\n\n\\boxed{1}", None, ("A", "\\boxed{1}", "tags", True)),      # <think> was in the prompt
    ("\\boxed{1}", "A", ("A", "\\boxed{1}", "field", True)),                      # reasoning_content
    ("<think>\nA and then", None, ("A and then", "", "tags", False)),            # never closed
    ("The answer is \\boxed{1}", None, ("", "The answer is \\boxed{1}", "none", True)),
])
def test_split_reasoning(text, reasoning, expected):
    completion = Completion(text=text, num_tokens=1, finish_reason="stop", reasoning=reasoning)
    assert distill.split_reasoning(completion) == expected


# ---- the endpoint, misbehaving ----

def test_misbehaving_server_every_record_once_errors_filed_key_never_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    rows = [("think", "ANSWER=11 reasoning in tags", 11), ("field", "ANSWER=12 [[style:reasoning]]", 12),
            ("plain", "ANSWER=13 [[style:plain]]", 13), ("length", "ANSWER=14 [[length]]", 14),
            ("429", "ANSWER=15 [[fail:429]]", 15), ("500", "ANSWER=16 [[fail:500]]", 16),
            ("503", "ANSWER=17 [[fail:503]]", 17), ("hang", "ANSWER=18 [[fail:hang]]", 18),
            ("drop", "ANSWER=19 [[fail:drop]]", 19), ("400", "ANSWER=20 [[fail:400]]", 20),
            ("wrong", "ANSWER=21 but the gold answer differs", 22)]
    problems = write_problems(tmp_path / "problems.jsonl", rows)
    extra = ["--api-key-env", "DISTILL_TEST_KEY", "--timeout", "0.5", "--concurrency", "4"]
    with OpenAIServer(hang_s=1.5) as server:
        summary = run(tmp_path, problems, server.base_url, *extra)
        accepted, rejected, errors = files(tmp_path)
        by_pid = {r["problem_id"]: r for r in accepted + rejected}
        assert sorted(r["problem_id"] for r in accepted + rejected) == sorted(i for i, _, _ in rows if i != "400")
        assert {r["problem_id"] for r in accepted} == {"think", "field", "429", "500", "503", "hang", "drop"}
        assert by_pid["field"]["thinking"] == "Let me think. Done." and by_pid["field"]["reasoning_source"] == "field"
        assert by_pid["think"]["thinking"] == "Let me think. Done."
        assert by_pid["think"]["solution"] == "The answer is $\\boxed{11}$."
        assert by_pid["plain"]["flags"] == ["no_thinking"] and by_pid["plain"]["extracted"] == 13
        assert by_pid["length"]["flags"] == ["truncated", "unclosed_think", "no_answer"]
        assert by_pid["wrong"]["flags"] == ["wrong"] and by_pid["wrong"]["extracted"] == 21
        assert [(e["problem_id"], e["status"], e["attempts"]) for e in errors] == [("400", 400, 1)]
        assert summary["failing"] == 1 and summary["counts"]["accepted"] == 7 and summary["counts"]["rejected"] == 3
        assert summary["counts"]["flags"] == {"contaminated": 0, "truncated": 1, "unclosed_think": 1, "no_thinking": 1,
                                              "no_answer": 1, "wrong": 1}
        tried = {user_text(r["body"]).split()[0]: r["attempt"] for r in server.requests}   # last attempt per problem
        assert [tried[f"ANSWER={n}"] for n in (15, 16, 17, 18, 19, 20)] == [2, 2, 2, 2, 2, 1]
        assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.requests)
        # a rerun asks again only for the failed request (the scripted 400 now succeeds)
        before = len(server.requests)
        summary = run(tmp_path, problems, server.base_url, *extra)
        assert [user_text(r["body"]).split()[0] for r in server.requests[before:]] == ["ANSWER=20"]
    accepted, rejected, _ = files(tmp_path)
    ids = [r["id"] for r in accepted + rejected]
    assert len(ids) == len(set(ids)) == len(rows) and summary["failing"] == 0 and summary["counts"]["accepted"] == 8
    captured = capsys.readouterr()
    for path in tmp_path.rglob("*"):
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in captured.out + captured.err and "accepted" in captured.out


def test_o_series_hidden_reasoning_is_recorded_and_rejected(tmp_path, capsys):
    def responder(body, attempt):
        action = reply("The answer is $\\boxed{7}$.", reasoning_tokens=50)
        action.body["usage"]["completion_tokens"] += 50
        return action
    problems = write_problems(tmp_path / "p.jsonl", [("a", "What is 3+4?", 7)])
    with OpenAIServer(responder) as server:
        distill.main(["--problems", str(problems), "--teacher", server.base_url, "--api-model", "o3-mini",
                      "--out", str(tmp_path / "t.jsonl"), "--system", "Be brief."])
        body = server.requests[0]["body"]
    assert "max_completion_tokens" in body and "temperature" not in body and "top_p" not in body
    assert [m["role"] for m in body["messages"]] == ["user"] and body["messages"][0]["content"].startswith("Be brief.")
    _, rejected, _ = files(tmp_path, "t.jsonl")
    r, = rejected
    assert (r["reasoning_visible"], r["reasoning_tokens"], r["flags"]) == (False, 50, ["no_thinking"]) and r["correct"]
    assert "o-series hide it" in capsys.readouterr().out


# ---- crash safety ----

def test_sigkill_at_random_points_then_rerun_gives_every_record_once(tmp_path):
    rng = random.Random(1234)
    rows = [(f"p{i}", f"Problem {i}: ANSWER={i}", i if i % 3 else i + 1) for i in range(50)]   # a third wrong
    problems = write_problems(tmp_path / "problems.jsonl", rows)
    out = tmp_path / "traces.jsonl"
    rejected = Path(f"{out}.rejected.jsonl")
    def responder(body, attempt):
        action = default_responder(body, attempt)
        action.delay = random.uniform(0.005, 0.05)
        return action
    def saved():
        return sum(p.read_bytes().count(b"\n") for p in (out, rejected) if p.exists())
    with OpenAIServer(responder) as server:
        cmd = [sys.executable, "distill.py", "--problems", str(problems), "--teacher", server.base_url,
               "--api-model", "m", "--out", str(out), "--samples-per-problem", "4", "--concurrency", "8"]
        kills, killed, counts = 0, 0, []
        for _ in range(12):
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kills == 4:
                assert proc.wait(timeout=120) == 0
                break
            if kills == 0:      # during startup (importing torch alone takes longer)
                time.sleep(rng.uniform(0.05, 0.8))
            else:               # somewhere in the stream of answers
                target = saved() + rng.randint(5, 40)
                while proc.poll() is None and saved() < target:
                    time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
            kills += 1
            counts.append(saved())
            if kills == 2:      # as if the kill had landed in the middle of a write
                with open(out, "ab") as f:
                    f.write(b'{"id": "torn", "problem": "half a li')
        requests = len(server.requests)
    lines = [line for p in (out, rejected) for line in p.read_text().split("\n")]
    assert lines.count("") == 2 and all(p.read_bytes().endswith(b"\n") for p in (out, rejected))
    records = [json.loads(line) for line in lines if line]
    expected = {sample_id(p, k) for _, p, _ in rows for k in range(4)}
    assert len(records) == 200 and {r["id"] for r in records} == expected
    assert all(r["accepted"] == (int(r["problem_id"][1:]) % 3 != 0) for r in records)
    assert counts == sorted(counts) and killed >= 3 and requests >= 200


# ---- problems: decontamination, duplicates ----

def test_decontamination_catches_a_reworded_copy_of_aime24(data_dir):
    aime = [json.loads(line) for line in (data_dir / "aime24.jsonl").read_text().splitlines()]
    refs = distill.load_references([data_dir / f"{name}.jsonl" for name in ("aime24", "aime25", "amc23", "math500")])
    for p in aime[:5]:
        copy = "  ".join(p["problem"].upper().split()).replace("$", " $ ")      # other whitespace and case
        assert distill.contamination(copy, refs)["matches"] == f"aime24.jsonl:{p['id']}"
    unrelated = ["James runs 3 sprints 3 times a week, 60 meters each sprint. How many meters does he run a week?",
                 "What is 7*8?",
                 "Find the number of ordered pairs of socks a drawer of 10 red and 12 blue socks holds.",
                 "A train leaves at noon at 60 miles per hour; a second train leaves an hour later at 80 miles "
                 "per hour. When does the second train catch up?"]
    assert [distill.contamination(u, refs) for u in unrelated] == [None] * len(unrelated)


@pytest.mark.slow
def test_real_r1_traces_are_not_flagged(data_dir, traces_sample):
    refs = distill.load_references([data_dir / f"{name}.jsonl" for name in ("aime24", "aime25", "amc23", "math500")])
    traces = [json.loads(line)["problem"] for line in traces_sample.read_text().splitlines()]
    assert sum(distill.contamination(t, refs) is not None for t in traces) == 0      # GSM8K / MATH train


def test_contaminated_and_duplicate_problems_are_never_sent(tmp_path, data_dir):
    first = json.loads((data_dir / "aime24.jsonl").read_text().splitlines()[0])
    copy = "\n".join(first["problem"].lower().split())
    rows = [("aime-copy", copy, int(first["answer"])), ("a", "What is 2+3? Add them.", 5),
            ("a-dup", "  what IS 2 + 3 ?   add them", 5), ("b", "What is 7*8? Multiply.", 56)]
    problems = write_problems(tmp_path / "p.jsonl", rows)
    decon = ["--decontaminate", "aime24", "math500"]                  # bundled sets, by name
    with OpenAIServer() as server:
        summary = run(tmp_path, problems, server.base_url, *decon)
        sent = [user_text(r["body"]) for r in server.requests]
    assert sorted(s.split("?")[0] for s in sent) == ["What is 2+3", "What is 7*8"]
    assert summary["problems"]["duplicates"] == [{"id": "a-dup", "duplicate_of": "a"}]
    c, = summary["problems"]["contaminated"]
    assert (c["id"], c["matches"], c["overlap"]) == ("aime-copy", "aime24.jsonl:2024-I-1", 1.0)
    run_json = json.loads((tmp_path / "traces.jsonl.run.json").read_text())
    assert run_json["problems"]["contaminated"] == summary["problems"]["contaminated"]
    inputs = {Path(i["path"]).name for i in run_json["manifest"]["inputs"]}
    assert inputs == {"p.jsonl", "aime24.jsonl", "math500.jsonl"}
    # --keep-all sends the contaminated problem too, flagged; the duplicate is the same problem: never
    with OpenAIServer() as server:
        run(tmp_path, problems, server.base_url, *decon, "--keep-all", out="all.jsonl")
        assert len(server.requests) == 3
    rows_all, rejected, _ = files(tmp_path, "all.jsonl")
    assert rejected == [] and not Path(f"{tmp_path / 'all.jsonl'}.rejected.jsonl").exists()
    flagged = {r["problem_id"]: r["flags"] for r in rows_all}
    assert flagged["aime-copy"][0] == "contaminated" and flagged["a"] == flagged["b"] == []
    assert all(r["accepted"] == (not r["flags"]) for r in rows_all)


# ---- grading: non-integer answers ----

MATRIX = "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"
# gold: (the same answer written another way, a wrong answer)
LATEX = {"\\frac{14}{3}": ("4\\frac{2}{3}", "4.67"),
         "(-\\infty, 3]": ("\\left(-\\infty, 3\\right]", "(-\\infty, 3)"),
         "(3, -1)": ("\\left(3,-1\\right)", "(-1, 3)"),
         MATRIX: ("\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
                  "\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
         "\\text{(C)}": ("C", "\\text{(D)}"),
         "3\\sqrt{13}": ("\\sqrt{117}", "10.8")}


def test_non_integer_answers_accepted_when_right_or_equivalent(tmp_path, capsys):
    rows, says = [], {}
    for n, (gold, (equivalent, wrong)) in enumerate(LATEX.items()):
        for kind, answer in (("right", gold), ("equivalent", equivalent), ("wrong", wrong)):
            rows.append((f"{kind}-{n}", f"Problem {n}, {kind} teacher: find the value.", gold))
            says[rows[-1][1]] = f"$\\boxed{{{answer}}}$"
    rows.append(("unboxed", "Problem 6: no box.", "\\frac{1}{2}"))
    says[rows[-1][1]] = "the answer is $\\frac{1}{2}$"
    problems = write_problems(tmp_path / "p.jsonl", rows)

    def teacher(body, attempt):
        problem = user_text(body).split("\n\n")[0]
        return reply(f"<think>\nWorking it out.\n</think>\n\nSo {says[problem]}.")
    with OpenAIServer(teacher) as server:
        summary = run(tmp_path, problems, server.base_url)
    accepted, rejected, _ = files(tmp_path)
    assert sorted(r["problem_id"] for r in accepted) == sorted(i for i, _, _ in rows if not i.startswith(("wrong", "unb")))
    assert {r["problem_id"]: r["flags"] for r in rejected} == {**{f"wrong-{n}": ["wrong"] for n in range(6)},
                                                               "unboxed": ["no_answer"]}
    assert all(r["correct"] and r["answer"] == r["extracted"] for r in accepted if r["problem_id"].startswith("right"))
    assert summary["counts"]["flags"]["wrong"] == 6 and summary["counts"]["flags"]["no_answer"] == 1
    printed = capsys.readouterr().out
    assert re.search(r"wrong answer +6\n", printed) and re.search(r"no boxed answer +1\n", printed)


# ---- budget, truncation, configuration ----

def test_budget_stops_sending_and_saves_what_was_in_flight(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", [(f"p{i}", f"ANSWER={i} question {i}", i) for i in range(20)])
    def responder(body, attempt):
        action = default_responder(body, attempt)
        action.delay = 0.05
        return action
    with OpenAIServer(responder) as server:
        summary = run(tmp_path, problems, server.base_url, "--max-total-tokens", "25", "--concurrency", "2")
        accepted, _, _ = files(tmp_path)
        assert len(server.requests) == len(accepted) < 20        # every request sent was saved
        tokens = [r["num_tokens"] for r in accepted]
        assert sum(tokens) >= 25 and sum(tokens[:-2]) < 25       # at most one answer in flight after the limit
        assert summary["this_run"]["stopped"] == "budget"
        again = run(tmp_path, problems, server.base_url, "--max-total-tokens", "25", "--concurrency", "2")
        assert len(server.requests) == len(accepted) and again["this_run"]["new_answers"] == 0


def test_truncated_answers_are_asked_again_only_with_a_larger_budget(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", [("long", "ANSWER=1 [[length]]", 1), ("ok", "ANSWER=2 fine", 2)])
    with OpenAIServer() as server:
        run(tmp_path, problems, server.base_url, "--max-tokens", "100")
        run(tmp_path, problems, server.base_url, "--max-tokens", "100")
        assert len(server.requests) == 2
        summary = run(tmp_path, problems, server.base_url, "--max-tokens", "200")
        assert [user_text(r["body"]).split()[0] for r in server.requests[2:]] == ["ANSWER=1"]
        assert server.requests[2]["body"]["max_tokens"] == 200
    _, rejected, _ = files(tmp_path)
    assert [r["sampling"]["max_tokens"] for r in rejected] == [100, 200]
    assert summary["counts"]["answers"] == 2 and summary["counts"]["flags"]["truncated"] == 1


def test_changed_configuration_is_refused(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", [("a", "ANSWER=1 x", 1)])
    with OpenAIServer() as server:
        run(tmp_path, problems, server.base_url)
        with pytest.raises(SystemExit, match="temperature"):
            run(tmp_path, problems, server.base_url, "--temperature", "1.0")


# ---- what sft.py reads ----

def test_sft_reads_the_accepted_traces(tmp_path, smollm2):
    sft = pytest.importorskip("sft")
    from model import Tokenizer
    problems = write_problems(tmp_path / "p.jsonl", [("a", "ANSWER=4 first", 4), ("b", "ANSWER=5 [[style:reasoning]]", 5),
                                                     ("c", "ANSWER=6 [[style:plain]]", 6)])
    with OpenAIServer() as server:
        run(tmp_path, problems, server.base_url)
    accepted, rejected, _ = files(tmp_path)
    assert len(accepted) == 2 and len(rejected) == 1
    examples, counts = sft.load_examples(tmp_path / "traces.jsonl", Tokenizer(smollm2), max_len=4096)
    assert counts["kept"] == len(examples) == 2
    for r in accepted:
        user, assistant = sft.to_messages(r)
        assert user["content"] == distill.user_prompt(r["problem"])
        assert assistant["content"] == f"<think>\n{r['thinking']}\n</think>\n\n{r['solution']}"


@pytest.fixture
def one_thread():
    """Tiny matmuls on a CPU shared with other test runs: one thread is several times faster than two."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_local_teacher_writes_trace_rows(tmp_path, smollm2, one_thread):
    problems = write_problems(tmp_path / "p.jsonl", [("add", "What is 2+3?", 5), ("mul", "What is 7*8?", 56)])
    summary = run(tmp_path, problems, str(smollm2), "--max-tokens", "32", "--keep-all", "--device", "cpu",
                  "--dtype", "float32", "--temperature", "0")
    rows, rejected, errors = files(tmp_path)
    assert sorted(r["problem_id"] for r in rows) == ["add", "mul"] and rejected == errors == []
    for r in rows:
        assert isinstance(r["thinking"], str) and isinstance(r["solution"], str) and r["thinking"] + r["solution"]
        assert r["teacher"]["kind"] == "local" and r["finish_reason"] in ("stop", "length")
        assert 0 < r["num_tokens"] <= 32
        assert ("truncated" in r["flags"]) == (r["finish_reason"] == "length")
        assert r["accepted"] == (not r["flags"]) and r["answer"] == {"add": 5, "mul": 56}[r["problem_id"]]
    assert summary["teacher"]["model"] == str(smollm2.resolve())
    assert summary["manifest"]["model"]["path"] == str(smollm2.resolve())
    sft = pytest.importorskip("sft")
    from model import Tokenizer
    # a row sft.py would refuse (no thinking, or nothing after it) is always one flagged as such
    examples, counts = sft.load_examples(tmp_path / "traces.jsonl", Tokenizer(smollm2), max_len=4096, skip_bad=True)
    assert counts["kept"] + counts["bad"] == 2
    for r in rows:
        if not (r["thinking"] and r["solution"]):
            assert {"no_thinking", "unclosed_think"} & set(r["flags"])


def test_sigterm_stops_sending_and_saves_the_answers_in_flight(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", [(f"p{i}", f"ANSWER={i} question {i}", i) for i in range(40)])
    out = tmp_path / "traces.jsonl"
    def responder(body, attempt):
        action = default_responder(body, attempt)
        action.delay = 0.3
        return action
    with OpenAIServer(responder) as server:
        proc = subprocess.Popen([sys.executable, "distill.py", "--problems", str(problems), "--teacher", server.base_url,
                                 "--api-model", "m", "--out", str(out), "--concurrency", "4"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not out.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        sent = len(server.requests)
    assert proc.returncode == 1 and "stopped early: interrupted" in output
    assert len(read_jsonl(out)) == sent < 40              # every request sent was saved, and no more were sent
