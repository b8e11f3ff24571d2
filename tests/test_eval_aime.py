"""eval_aime.py end to end on 3 problems of aime24: with a fake sampler, through --base-url against the
loopback server, resumed after lost and torn lines, refused on a changed configuration, sharded, and
killed with SIGKILL mid-run; MATH-500's LaTeX answers and per-level / per-subject tables; the embedded
SmolLM2 for real on two MATH-500 problems.

    .venv/bin/python -m pytest tests/test_eval_aime.py -q
"""
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import eval_aime
import model
from eval_aime import load_problems, summarize, user_prompt
from openai_server import OpenAIServer, error, reply, user_text
from sample import Completion

REPO = Path(__file__).resolve().parents[1]
AIME24 = eval_aime.data_path("aime24")
GOLD = {user_prompt(p["problem"]): p["answer"] for p in load_problems(AIME24)}


def scripted(gold, seed):
    """What the 'model' writes for a given seed: truncated, no box, wrong, or right (half the time)."""
    r = seed % 6
    if r == 0:
        return "<think>\nLet me set up the equations and", "length"
    if r == 1:
        return "<think>\nok\n</think>\n\nThe answer is **%d**." % gold, "stop"
    if r == 2:
        return "<think>\nok\n</think>\n\n$\\boxed{%d}$" % (gold + 1), "stop"
    return "<think>\nok\n</think>\n\nThe answer is $\\boxed{%03d}$." % gold, "stop"


class FakeSampler:
    """generate/describe like sample.py's samplers; yields in reverse order to exercise 'any order'."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests, params, on_token=None, errors="raise"):
        for i in reversed(range(len(requests))):
            r = requests[i]
            text, finish = scripted(GOLD[r.prompt or r.messages[-1]["content"]], r.seed)
            self.calls += 1
            yield i, Completion(text=text, num_tokens=len(text.split()), finish_reason=finish)

    def describe(self):
        return {"kind": "fake"}


def responder(body, attempt):
    """The loopback server as the same scripted 'model': identical texts to FakeSampler for a seed."""
    text, finish = scripted(GOLD[user_text(body)], body["seed"])
    return reply(text, finish_reason=finish)


def score(out, *extra, sampler=None):
    argv = ["--data", "aime24", "--limit", "3", "--out", str(out), *extra]
    return eval_aime.main(argv, sampler=FakeSampler() if sampler is None else sampler)


def lines(path):
    return Path(path).read_text().splitlines()


def records_of(path):
    return {(r["id"], r["sample"]): r for r in map(json.loads, lines(path))}


def same_scores(a, b):
    assert a["metrics"] == b["metrics"] and a["per_problem"] == b["per_problem"] and a["config"] == b["config"]


def test_greedy_run_is_complete_and_consistent(tmp_path, capsys):
    out = tmp_path / "greedy.jsonl"
    s = score(out, "--temperature", "0", "--samples", "1")
    rows = [json.loads(x) for x in lines(out)]
    assert [(r["id"], r["sample"]) for r in rows] == [("2024-I-1", 0), ("2024-I-2", 0), ("2024-I-3", 0)]
    for r in rows:
        assert {"id", "sample", "seed", "text", "extracted", "correct", "finish_reason", "num_tokens"} <= r.keys()
        assert r["correct"] == (r["extracted"] == r["gold"])
    m = s["metrics"]
    assert m["greedy_accuracy"] == m["pass@1"] == sum(r["correct"] for r in rows) / 3
    assert json.loads(Path(f"{out}.summary.json").read_text())["metrics"] == m
    assert s["manifest"]["inputs"][0]["sha256"] == s["config"]["data_sha256"]
    assert s["config"]["temperature"] == 0 and s["sampler"] == {"kind": "fake"}
    printed = capsys.readouterr().out
    assert "greedy accuracy" in printed and "2024-I-1" in printed


def test_sampled_run_metrics_match_the_records(tmp_path):
    out = tmp_path / "k4.jsonl"
    s = score(out, "--samples", "4")
    rows = [json.loads(x) for x in lines(out)]
    assert len(rows) == 12 and len({(r["id"], r["sample"]) for r in rows}) == 12
    assert len({r["seed"] for r in rows}) == 12                      # every sample has its own seed
    records = {(r["id"], r["sample"]): r for r in rows}
    problems = load_problems(AIME24)[:3]
    assert summarize(problems, records, 4)[0] == s["metrics"]
    m = s["metrics"]
    assert {"pass@1", "pass@1_stderr", "pass@1_ci95", "pass@2", "pass@4", "maj@4", "no_answer_rate",
            "truncation_rate", "mean_tokens", "max_tokens"} <= m.keys()
    assert m["truncation_rate"] == sum(r["finish_reason"] == "length" for r in rows) / 12
    assert m["no_answer_rate"] == sum(r["extracted"] is None for r in rows) / 12
    for pp in s["per_problem"]:
        assert pp["correct"] == sum(r["correct"] for r in rows if r["id"] == pp["id"])
        assert sum(pp["votes"].values()) == 4


def test_resume_after_lost_and_torn_lines(tmp_path):
    out = tmp_path / "k4.jsonl"
    first = score(out, "--samples", "4")
    full = out.read_text()
    kept = lines(out)[:7]
    out.write_text("\n".join(kept) + "\n" + lines(out)[8][:40])      # 5 lines lost, the last one torn
    fake = FakeSampler()
    again = score(out, "--samples", "4", sampler=fake)
    assert fake.calls == 5 and out.read_text() == full
    same_scores(first, again)
    fake = FakeSampler()
    score(out, "--samples", "4", sampler=fake)                         # nothing left to do
    assert fake.calls == 0 and out.read_text() == full
    fake = FakeSampler()
    more = score(out, "--samples", "8", sampler=fake)                  # raising K reuses the 4 drawn
    assert fake.calls == 12 and len(lines(out)) == 24 and "pass@8" in more["metrics"]
    more_lines = lines(out)
    fewer = eval_aime.main(["--data", "aime24", "--limit", "2", "--samples", "4", "--out", str(out)],
                           sampler=FakeSampler())                      # a subset is scored from the file
    assert fewer["metrics"] == summarize(load_problems(AIME24)[:2], records_of(out), 4)[0]
    assert first["per_problem"][:2] == fewer["per_problem"]
    assert lines(out) == more_lines                                    # records beyond --limit kept intact


def test_different_configuration_is_refused(tmp_path):
    out = tmp_path / "k4.jsonl"
    score(out, "--samples", "4")
    with pytest.raises(SystemExit, match=r"temperature: 0\.6 -> 0\.7.*top_p: 0\.95 -> 0\.9"):
        score(out, "--samples", "4", "--temperature", "0.7", "--top-p", "0.9")
    Path(f"{out}.config.json").unlink()
    with pytest.raises(SystemExit, match="cannot tell how those samples were made"):
        score(out, "--samples", "4")


class Recorder(FakeSampler):
    def generate(self, requests, params, **kw):
        self.requests = list(requests)
        yield from super().generate(requests, params, **kw)


def test_system_message_comes_first_and_is_part_of_the_configuration(tmp_path, capsys):
    plain, teacher = Recorder(), Recorder()
    assert score(tmp_path / "plain.jsonl", "--samples", "2", sampler=plain)["config"]["system"] is None
    assert all([m["role"] for m in r.messages] == ["user"] for r in plain.requests)
    out = tmp_path / "teacher.jsonl"
    s = score(out, "--samples", "2", "--system", "Box it.", sampler=teacher)
    assert s["config"]["system"] == "Box it." and len(teacher.requests) == 6
    assert all(r.messages[0] == {"role": "system", "content": "Box it."} and r.messages[1:] == p.messages
               for r, p in zip(teacher.requests, plain.requests))
    with pytest.raises(SystemExit, match=r"system: 'Box it\.' -> None"):
        score(out, "--samples", "2")                     # samples drawn with another prompt are not mixed in
    with pytest.raises(model.UserError, match="--system needs the chat template"):   # one line, exit 2 under cli()
        score(tmp_path / "raw.jsonl", "--raw-prompt", "--system", "Box it.")


def test_shards_merge_to_the_single_run(tmp_path, monkeypatch):
    single = score(tmp_path / "single.jsonl", "--samples", "4")
    out = tmp_path / "sharded.jsonl"
    assert score(out, "--samples", "4", "--shard", "1/2") is None      # shard 0 not done yet: no merge
    assert Path(f"{out}.shard1of2").exists() and not out.exists()
    merged = score(out, "--samples", "4", "--shard", "0/2")
    same_scores(single, merged)
    assert out.read_text() == (tmp_path / "single.jsonl").read_text()
    assert not list(tmp_path.glob("sharded.jsonl.shard*"))
    # torchrun: ranks from the environment; rank 0 waits for the others and merges
    out = tmp_path / "torchrun.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in (2, 1, 0):
        monkeypatch.setenv("RANK", str(rank))
        result = score(out, "--samples", "4")
    same_scores(single, result)
    assert out.read_text() == (tmp_path / "single.jsonl").read_text()


def test_bad_problem_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    cases = {'{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "q"}\n': "bad.jsonl:2: no answer",
             '{"id": "a", "problem": "p", "answer": " "}\n': "bad.jsonl:1: no answer",
             '{"id": "a", "problem": "p", "answer": null}\n': "bad.jsonl:1: no answer",
             '{"id": "a", "problem": "p", "answer": ["1"]}\n': "bad.jsonl:1: no answer",
             '{"id": "a", "problem": "p", "answer": 1}\n{"id": "a", "problem": "q", "answer": 2}\n':
             "bad.jsonl:2: duplicate id 'a'",
             '{"id": "a", "problem": "p", "answer": 1}\n\n{"id": "b", "problem": "q"\n':
             "bad.jsonl:3: not valid JSON",
             '{"id": "a", "answer": 1}\n': "bad.jsonl:1: no problem text"}
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(SystemExit, match=message):
            eval_aime.main(["--data", str(bad)], sampler=FakeSampler())
    bad.write_text('{"ID": 7, "Problem": "p", "Answer": "033"}\n{"question": "q", "answer": 12.0}\n'
                   '{"unique_id": "u", "problem": "r", "answer": " \\\\frac{1}{2} ", "level": 3, "subject": "Algebra"}\n'
                   '{"problem": "s", "answer": 0.5}\n')
    assert load_problems(bad) == [{"id": "7", "problem": "p", "answer": 33},
                                  {"id": "line-2", "problem": "q", "answer": 12},
                                  {"id": "u", "problem": "r", "answer": "\\frac{1}{2}", "level": 3, "subject": "Algebra"},
                                  {"id": "line-4", "problem": "s", "answer": "0.5"}]


def test_bundled_sets_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sizes = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "aime_historical": 919}
    for name, n in sizes.items():
        assert eval_aime.data_path(name) == str(REPO / "data" / f"{name}.jsonl")
        assert len(load_problems(eval_aime.data_path(name))) == n
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"id": "a", "problem": "p", "answer": "(3,4]"}\n')
    assert eval_aime.data_path(str(mine)) == str(mine) and eval_aime.data_path("mine.jsonl") == "mine.jsonl"
    with pytest.raises(SystemExit, match="aime99"):
        eval_aime.main(["--data", "aime99"], sampler=FakeSampler())


def test_endpoint_run_equals_the_fake_run(tmp_path):
    fake = score(tmp_path / "fake.jsonl", "--samples", "4")
    with OpenAIServer(responder) as server:
        s = eval_aime.main(["--data", "aime24", "--limit", "3", "--samples", "4", "--out", str(tmp_path / "ep.jsonl"),
                            "--base-url", server.base_url, "--api-model", "test-model", "--concurrency", "4"])
        assert len(server.requests) == 12 and {r["body"]["model"] for r in server.requests} == {"test-model"}
        assert all(r["body"]["temperature"] == 0.6 and r["body"]["max_tokens"] == 32768 for r in server.requests)
    assert s["metrics"] == fake["metrics"] and s["per_problem"] == fake["per_problem"]
    assert s["sampler"]["kind"] == "endpoint" and s["config"]["api_model"] == "test-model"


def test_chat_template_kwargs_reach_the_server_and_the_records(tmp_path):
    out = tmp_path / "k.jsonl"
    with OpenAIServer(responder) as server:
        s = eval_aime.main(["--data", str(AIME24), "--limit", "1", "--samples", "1", "--out", str(out), "--base-url",
                            server.base_url, "--api-model", "m", "--chat-template-kwargs", '{"enable_thinking": false}'])
        assert [r["body"]["chat_template_kwargs"] for r in server.requests] == [{"enable_thinking": False}]
    assert s["config"]["chat_template_kwargs"] == s["manifest"]["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(SystemExit, match="chat_template_kwargs"):  # it changes the prompt: no resume without it
        score(out, "--samples", "1")


MATH500 = load_problems(eval_aime.data_path("math500"))
VARIANT = {"\\left( 3, \\frac{\\pi}{2} \\right)": "(3, \\pi/2)", "p - q": "-q+p", "\\frac{14}{3}": "\\dfrac{14}{3}",
           9: "009", "\\text{Evelyn}": "Evelyn", 42: "42.0"}      # the first 6 golds, written another way


class Math500Sampler(FakeSampler):
    """By seed: the gold as written, an equivalent answer written otherwise, a wrong box, or no box."""
    KINDS = ("right", "equivalent", "wrong", "unboxed")

    def generate(self, requests, params, on_token=None, errors="raise"):
        gold = {user_prompt(p["problem"]): p["answer"] for p in MATH500}
        for i, r in enumerate(requests):
            g = gold[r.messages[-1]["content"]]
            kind = self.KINDS[r.seed % 4]
            answer = {"right": f"\\boxed{{{g}}}", "equivalent": f"\\boxed{{{VARIANT[g]}}}",
                      "wrong": "\\boxed{\\frac{1}{7}}", "unboxed": f"the answer is {g}"}[kind]
            yield i, Completion(text=f"<think>\nok\n</think>\n\n{answer}", num_tokens=5, finish_reason="stop")


def test_math500_latex_answers_votes_and_tables(tmp_path, capsys):
    out = tmp_path / "math500.jsonl"
    s = eval_aime.main(["--data", "math500", "--limit", "6", "--samples", "4", "--out", str(out)],
                       sampler=Math500Sampler())
    rows = [json.loads(x) for x in lines(out)]
    kinds = {(r["id"], r["sample"]): Math500Sampler.KINDS[r["seed"] % 4] for r in rows}
    assert len(rows) == 24 and len(set(kinds.values())) == 4
    for r in rows:
        kind = kinds[(r["id"], r["sample"])]
        assert r["correct"] == (kind in ("right", "equivalent")), (kind, r["gold"], r["text"])
        assert (r["extracted"] is None) == (kind == "unboxed" or (kind == "wrong" and isinstance(r["gold"], int)))
    m = s["metrics"]
    assert m == summarize(MATH500[:6], records_of(out), 4)[0]
    assert m["pass@1"] == sum(r["correct"] for r in rows) / 24
    for field in ("level", "subject"):
        for group, g in m[f"by_{field}"].items():
            ids = {p["id"] for p in MATH500[:6] if str(p[field]) == group}
            assert g["problems"] == len(ids)
            assert g["pass@1"] == pytest.approx(sum(r["correct"] for r in rows if r["id"] in ids) / 4 / len(ids))
    assert sum(g["problems"] for g in m["by_level"].values()) == 6 == sum(g["problems"] for g in m["by_subject"].values())
    for pp in s["per_problem"]:       # right and equivalent answers are one class; the wrong boxes another
        right = [k for k in range(4) if kinds[(pp["id"], k)] in ("right", "equivalent")]
        wrong = [k for k in range(4) if kinds[(pp["id"], k)] == "wrong" and isinstance(pp["gold"], str)]
        wins = bool(right) and (len(right) > len(wrong) or len(right) == len(wrong) and right[0] < wrong[0])
        assert pp["majority_correct"] == wins
    printed = capsys.readouterr().out
    assert "\nlevel " in printed and "\nsubject " in printed and "Intermediate Algebra" in printed


@pytest.mark.parametrize("protocol", [["--temperature", "0", "--samples", "1"], ["--samples", "2"]])
def test_local_model_end_to_end(smollm2, tmp_path, protocol, capsys):
    # the embedded default model, for real: 2 MATH-500 problems, 4 new tokens per sample (a pipeline check, not a score)
    out = tmp_path / "local.jsonl"
    s = eval_aime.main(["--model", str(smollm2), "--data", "math500", "--limit", "2", "--max-new-tokens", "4",
                        "--device", "cpu", "--dtype", "float32", "--out", str(out), *protocol])
    k, greedy = int(protocol[-1]), protocol[1] == "0"
    rows = [json.loads(x) for x in lines(out)]
    assert [(r["id"], r["sample"]) for r in rows] == [(p["id"], j) for p in MATH500[:2] for j in range(k)]
    assert all(0 < r["num_tokens"] <= 4 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert s["metrics"] == summarize(MATH500[:2], records_of(out), k, greedy)[0]
    assert set(s["metrics"]["by_level"]) == {"2", "5"} and "\nlevel " in capsys.readouterr().out
    assert s["metrics"]["truncation_rate"] == sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    assert s["sampler"]["kind"] == "local" and s["manifest"]["model"]["path"] == str(smollm2.resolve())
    assert json.loads(Path(f"{out}.summary.json").read_text())["metrics"] == s["metrics"]


def test_endpoint_failures_keep_the_other_samples(tmp_path):
    out = tmp_path / "ep.jsonl"
    refused = {eval_aime.sample_seed(0, pid, 1) for pid in ("2024-I-1", "2024-I-2")}

    def flaky(body, attempt):                   # sample 1 of every problem is refused, until cleared
        return error(400, "bad request") if body["seed"] in refused else responder(body, attempt)
    with OpenAIServer(flaky) as server:
        argv = ["--data", "aime24", "--limit", "2", "--out", str(out), "--base-url", server.base_url,
                "--api-model", "m"]
        with pytest.raises(SystemExit, match="2 requests failed, first: .*HTTP 400.*bad request.*rerun"):
            eval_aime.main(argv)
        assert sorted(records_of(out)) == [("2024-I-1", 0), ("2024-I-1", 2), ("2024-I-1", 3),
                                           ("2024-I-2", 0), ("2024-I-2", 2), ("2024-I-2", 3)]
        refused.clear()
        assert eval_aime.main(argv)["metrics"]["problems"] == 2
        assert len(server.requests) == 8 + 2    # the rerun asked only for the two that failed


def test_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path):
    argv = [sys.executable, str(REPO / "eval_aime.py"), "--data", "aime24", "--limit", "3", "--samples", "4",
            "--concurrency", "2"]
    hold, release, served = threading.Event(), threading.Event(), itertools.count()

    def gated(body, attempt):                   # while `hold` is set, requests after the 4th wait for `release`
        if hold.is_set() and next(served) >= 4:
            release.wait(60)
        return responder(body, attempt)

    with OpenAIServer(gated) as server:
        argv += ["--base-url", server.base_url, "--api-model", "test-model"]
        reference = eval_aime.main(argv[2:] + ["--out", str(tmp_path / "ref.jsonl")])
        out = tmp_path / "killed.jsonl"
        hold.set()
        proc = subprocess.Popen(argv + ["--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(lines(out)) < 4):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)       # with 2 requests in flight
        proc.wait()
        hold.clear()
        release.set()
        assert len(lines(out)) == 4
        done = subprocess.run(argv + ["--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in lines(out)]
    assert sorted((r["id"], r["sample"]) for r in rows) == sorted({(r["id"], r["sample"]) for r in rows})
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()
    assert json.loads(Path(f"{out}.summary.json").read_text())["metrics"] == reference["metrics"]
