"""The loop's audit trail: from a score's summary, follow sha256s back through the checkpoint and the
traces to the teacher and its problems. Also the problem generator of loop.py.

    python -m pytest tests/test_loop.py -q
"""
import json
import subprocess
import sys

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
