"""What a careless user does to every script, and what each must do about it: an expected error is
one line on stderr and exit 2, Ctrl-C is exit 130, neither with a traceback; nothing that is not a
script's own is repaired, truncated or replaced; one writer per output; a resume refuses anything
that changes the result and names it. Tiny random models with SmolLM2's tokenizer, on CPU.

    python -m pytest tests/test_mistakes.py -q
"""
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import distill
import eval_aime
import loop
import sample
import sft
from conftest import REPO, make_hf_model, write_jsonl
from openai_server import OpenAIServer
from sample import Completion, LocalSampler, Request, SamplingParams

TRACES = [{"id": f"t{i}", "problem": f"What is {i} + {i}?", "thinking": f"{i} and {i} make {2 * i}.",
           "solution": f"So $\\boxed{{{2 * i}}}$.", "answer": 2 * i} for i in range(1, 5)]
FAST = ["--chunk-size", "256", "--device", "cpu"]


@pytest.fixture
def problems(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", [{"id": "a", "problem": "What is 3 + 4?", "answer": 7},
                                                     {"id": "b", "problem": "What is 2 + 5?", "answer": 7}])


def dead_port():
    with socket.socket() as s:                    # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sevens:
    """A sampler that answers \\boxed{7} to everything."""
    def generate(self, requests, params, on_token=None, errors="raise"):
        for i in range(len(requests)):
            yield i, Completion(text="So \\boxed{7}.", num_tokens=3, finish_reason="stop")

    def describe(self):
        return {"kind": "sevens"}


# ----------------------------------------------------------------------------- every script, every mistake

# Runs each case's script as `__main__` (its real command-line path) in one subprocess that imported
# torch once; a case with a delay gets a Ctrl-C (SIGINT) that many seconds into its run.
DRIVER = r"""
import contextlib, io, json, os, runpy, signal, sys, threading, traceback
sys.path.insert(0, sys.argv[2])
import model, sample, eval_aime, distill, sft, loop
results = []
for script, argv, interrupt_after in json.load(open(sys.argv[1])):
    err, code = io.StringIO(), 0
    sys.argv = [script, *argv]
    timer = threading.Timer(interrupt_after or 0, os.kill, (os.getpid(), signal.SIGINT))
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if interrupt_after:
                timer.start()
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException:                      # a traceback: the failure this test looks for
            code = "traceback"
            traceback.print_exc()
        finally:
            timer.cancel()
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_every_mistake_is_one_line_and_exit_2_and_ctrl_c_is_130(tmp_path, tiny, problems):
    S, E, D, T, L = (str(REPO / f) for f in ("sample.py", "eval_aime.py", "distill.py", "sft.py", "loop.py"))
    G = str(REPO / "tools" / "convert_gguf.py")
    data = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    bad_row = write_jsonl(tmp_path / "bad_row.jsonl", [TRACES[0], {"problem": "p", "thinking": 3}])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"id": "a", "problem": "Caf\u00e9 au lait?", "answer": 1}\n'.encode("latin-1"))
    not_ours = tmp_path / "not_ours.jsonl"
    not_ours.write_text('{"id": "x", "problem": "What is 1 + 1?", "answer": 2}')     # no newline at the end
    folder, a_file = tmp_path / "folder", tmp_path / "a_file"
    folder.mkdir()
    a_file.write_text("x")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_text("not a GGUF file")
    finished = tmp_path / "finished"
    sft.main(["--data", str(data), "--model", str(tiny), "--out", str(finished), "--max-steps", "1", *FAST])
    dead = f"http://127.0.0.1:{dead_port()}/v1"
    m, p, t = str(tiny), str(problems), str(tmp_path)
    slow_eval = [E, ["--model", m, "--data", p, "--samples", "64", "--batch-size", "1", "--max-new-tokens", "200",
                     "--device", "cpu", "--out", f"{t}/interrupted.jsonl"], 2.5]
    slow_sft = [T, ["--data", str(data), "--model", m, "--out", f"{t}/interrupted", "--max-steps", "100000",
                    "--save-every", "0", *FAST], 2.5]
    cases = {  # [script, argv] -> what its one line must say
        (S, "--model", m, "--prompt", "x", "--temperature", "-1"): "--temperature: must be a number >= 0, got '-1'",
        (S, "--model", m, "--prompt", "x", "--top-p", "0"): "--top-p: must be a number in (0, 1], got '0'",
        (S, "--model", m, "--prompt", "x", "--min-p", "5"): "--min-p: must be a number in [0, 1], got '5'",
        (S, "--model", m, "--prompt", "x", "--max-new-tokens", "0"): "--max-new-tokens: must be an integer >= 1",
        (S, "--model", m, "--prompt", "x", "--max-new-tokens", "-3"): "--max-new-tokens: must be an integer >= 1",
        (S, "--model", m, "--prompt", "x", "--top-k", "nan"): "--top-k: must be an integer >= 0, got 'nan'",
        (S, "--model", m, "--prompt", "word " * 300): "prompt has",
        (S, "--model", f"{t}/nope", "--prompt", "x"): "no such model folder",
        (S, "--base-url", dead, "--api-model", "m", "--prompt", "x"): "cannot connect to 127.0.0.1",
        (S, "--base-url", dead, "--api-model", "m", "--prompt", "x", "--api-key-env", "NO_SUCH_KEY_VAR"):
            "--api-key-env NO_SUCH_KEY_VAR: that environment variable is not set",
        (E, "--model", f"{t}/nope", "--data", p, "--out", f"{t}/e1.jsonl"): "no such model folder",
        (E, "--model", m, "--data", p, "--limit", "0"): "--limit: must be an integer >= 1, got '0'",
        (E, "--model", m, "--data", p, "--limit", "-1"): "--limit: must be an integer >= 1, got '-1'",
        (E, "--model", m, "--data", p, "--samples", "0"): "--samples: must be an integer >= 1",
        (E, "--model", m, "--data", str(latin1)): f"{latin1}: not UTF-8 text",
        (E, "--model", m, "--data", f"{t}/missing.jsonl"): f"{t}/missing.jsonl: No such file or directory",
        (E, "--model", m, "--data", p, "--out", str(folder)): "is a folder",
        (E, "--model", m, "--data", p, "--out", f"{a_file}/x.jsonl"): f"{a_file}: File exists",
        (E, "--model", m, "--data", p, "--shard", "2/2", "--out", f"{t}/e2.jsonl"): "--shard wants i/N",
        (E, "--model", m, "--data", str(not_ours), "--out", str(not_ours)): "cannot tell how those samples were made",
        (D, "--problems", p, "--teacher", m, "--out", str(not_ours)): "is not a distill.py output",
        (D, "--problems", p, "--teacher", m, "--out", f"{t}/d.jsonl", "--decontaminate", str(latin1)):
            f"{latin1}: not UTF-8 text",
        (D, "--problems", p, "--teacher", m, "--out", str(folder)): "is a folder",
        (D, "--problems", p, "--teacher", f"{t}/nope", "--out", f"{t}/d.jsonl"): "neither an http(s):// URL nor",
        (D, "--problems", p, "--teacher", dead, "--api-model", "m", "--out", f"{t}/d.jsonl"): "cannot connect",
        (D, "--problems", p, "--teacher", dead, "--api-model", "m", "--out", f"{t}/d.jsonl",
         "--api-key-env", "NO_SUCH_KEY_VAR"): "NO_SUCH_KEY_VAR",
        (D, "--problems", p, "--teacher", m, "--out", f"{t}/d.jsonl", "--top-p", "1.5"): "--top-p: must be",
        (D, "--problems", p, "--teacher", m, "--out", f"{t}/d.jsonl", "--min-overlap", "-0.1"): "--min-overlap",
        (D, "--problems", p, "--teacher", m, "--out", f"{t}/d.jsonl", "--max-total-tokens", "0"): "--max-total",
        (T, "--data", str(data), "--model", f"{t}/nope", "--out", f"{t}/s1"): "no config.json",
        (T, "--data", f"{t}/missing.jsonl", "--model", m, "--out", f"{t}/s2"): "missing.jsonl: No such file",
        (T, "--data", str(bad_row), "--model", m, "--out", f"{t}/s3", *FAST): "bad_row.jsonl:2: trace row needs",
        (T, "--data", str(latin1), "--model", m, "--out", f"{t}/s4", *FAST): f"{latin1}: not UTF-8 text",
        (T, "--data", str(data), "--model", m, "--out", f"{a_file}/s", *FAST): "Not a directory",
        (T, "--data", str(data), "--model", m, "--out", str(finished), "--max-steps", "1", *FAST):
            "pass --resume, or choose another --out",
        (T, "--data", str(data), "--model", m, "--out", str(finished), "--max-steps", "1", "--resume",
         "--grad-clip", "0.5", *FAST): "grad_clip: 1.0 -> 0.5",
        (T, "--data", str(data), "--model", m, "--out", f"{t}/s5", "--grad-accum", "-2"): "--grad-accum: must be",
        (T, "--data", str(data), "--model", m, "--out", f"{t}/s5", "--max-len", "0"): "--max-len: must be",
        (T, "--data", str(data), "--model", m, "--out", f"{t}/s5", "--chunk-size", "0"): "--chunk-size: must be",
        (T, "--data", str(data), "--model", m, "--out", f"{t}/s5", "--max-len", "9999", *FAST):
            "--max-len must be in [1, 256] (the model's context), got 9999",
        (T, "--data", str(data), "--model", m, "--out", str(problems.parent), *FAST): "did not write",
        (L, "--train", "0", "--out", f"{t}/loop"): "--train: must be an integer >= 1",
        (G, "--gguf", str(garbage), "--out", f"{t}/g"): f"{garbage}: GGUF magic invalid",
        (G, "--gguf", str(garbage), "--out", str(problems.parent)): "was not written by this tool",
    }
    if not torch.cuda.is_available():
        cases[(E, "--model", m, "--data", p, "--device", "cuda", "--out", f"{t}/e3.jsonl")] = "no CUDA device"
    if os.geteuid() != 0:                          # root writes anywhere
        (tmp_path / "read_only").mkdir(mode=0o555)
        cases[(T, "--data", str(data), "--model", m, "--out", f"{t}/read_only")] = "not writable"
    runs = [[c[0], list(c[1:]), None] for c in cases] + [slow_eval, slow_sft]
    (tmp_path / "cases.json").write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cases.json"), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    def one_line(r, case, expected):
        lines = r["stderr"].strip().splitlines()
        return (r["code"] == 2 and len(lines) == 1 and lines[0].startswith(f"{Path(case[0]).name}: error: ")
                and expected in lines[0])
    wrong = [(Path(case[0]).name, *case[1:], r["code"], r["stderr"][-600:])
             for (case, expected), r in zip(cases.items(), results) if not one_line(r, case, expected)]
    assert not wrong, "\n".join(map(str, wrong))
    for r in results[-2:]:                         # Ctrl-C: the usual cleanup, no traceback
        assert r["code"] == 130 and "Traceback" not in r["stderr"], r
        assert ".py: interrupted\n" in r["stderr"], r
    assert not Path(f"{t}/e1.jsonl.config.json").exists()   # a bad --model leaves no trace on its --out
    assert not_ours.read_text().endswith('"answer": 2}')      # nor is a file that is not ours repaired


# ----------------------------------------------------------------------------- data loss

def test_distill_never_cuts_a_file_it_did_not_write(tmp_path, problems, tiny):
    before = problems.read_bytes().rstrip(b"\n")
    problems.write_bytes(before)                   # its last line has no newline: what a repair would cut
    with pytest.raises(SystemExit):                # refused (the message: test_every_mistake...)
        distill.main(["--problems", str(problems), "--teacher", str(tiny), "--out", str(problems)])
    assert problems.read_bytes() == before


def sft_run(data, tiny, out, *extra):
    return sft.main(["--data", str(data), "--model", str(tiny), "--out", str(out), "--lr", "1e-3", *FAST, *extra])


def state_of(out):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}


def test_sft_resume_of_a_finished_run_without_checkpoints_keeps_it(tmp_path, tiny):
    data, out = write_jsonl(tmp_path / "d.jsonl", TRACES), tmp_path / "out"
    sft_run(data, tiny, out, "--max-steps", "2", "--save-every", "0")       # no step-N checkpoint at all
    before = state_of(out)
    sft_run(data, tiny, out, "--max-steps", "2", "--save-every", "0", "--resume")
    assert state_of(out) == before                 # not retrained from the base model, nothing rewritten
    with pytest.raises(SystemExit, match=r"max_steps: 2 -> 3"):
        sft_run(data, tiny, out, "--max-steps", "3", "--save-every", "0", "--resume")
    assert state_of(out) == before


def test_sft_removes_its_leftovers_and_refuses_changed_settings(tmp_path, tiny):
    data, out = write_jsonl(tmp_path / "d.jsonl", TRACES), tmp_path / "out"
    sft_run(data, tiny, out, "--max-steps", "4", "--save-every", "2")
    (out / "config.json").unlink()                 # as if killed while exporting the final model
    junk = [out / ".step-4.tmp-x1y2", out / "..final.tmp-abc", out / ".final", out / ".step-2.old-1-2", out / "step-3"]
    for folder in junk:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    junk += [out / "step-2" / ".trainer_state.pt.tmp-77", out / ".metrics.jsonl.tmp", out / ".run.json.tmp-5"]
    for f in junk[-3:]:
        f.write_text("partial")
    other = make_hf_model(tmp_path / "other", n_head=2, n_kv=1, head_dim=16, tokenizer_from=tiny, seed=1)
    changed = ["--grad-clip", "0.5", "--weight-decay", "0.1", "--chunk-size", "128", "--dtype", "bfloat16",
               "--model", str(other), "--eval-data", str(data)]
    with pytest.raises(SystemExit) as refused:
        sft_run(data, tiny, out, "--max-steps", "4", "--save-every", "2", "--resume", *changed)
    for key in ("grad_clip", "weight_decay", "chunk_size", "dtype", "model_fingerprint", "eval_data_sha256"):
        assert key in str(refused.value), key
    assert "\n" not in str(refused.value)
    sft_run(data, tiny, out, "--max-steps", "4", "--save-every", "2", "--resume")
    assert (out / "config.json").exists() and not [p for p in junk if p.exists()]
    assert [p.name for p in sft.checkpoints(out)] == ["step-2"]


# ----------------------------------------------------------------------------- silent mixing

@contextmanager
def held(path):
    """Hold the lock another run would hold on `path` (the file itself: a folder, or a .lock sidecar)."""
    fd = os.open(path, os.O_RDONLY if Path(path).is_dir() else os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def test_one_writer_per_output(tmp_path, problems, tiny):
    traces, scores, out = tmp_path / "traces.jsonl", tmp_path / "scores.jsonl", tmp_path / "sft"
    out.mkdir()
    with OpenAIServer() as server, held(f"{traces}.lock"):
        with pytest.raises(SystemExit, match="being written by another run"):
            distill.main(["--problems", str(problems), "--teacher", server.base_url, "--api-model", "m",
                          "--out", str(traces)])
        assert server.requests == []                # nobody paid twice
    with held(f"{scores}.lock"), pytest.raises(SystemExit, match="being written by another run"):
        eval_aime.main(["--data", str(problems), "--out", str(scores)], sampler=Sevens())
    assert not scores.exists()
    data = write_jsonl(tmp_path / "d.jsonl", TRACES)
    with held(out), pytest.raises(SystemExit, match="being written by another run"):
        sft_run(data, tiny, out, "--max-steps", "1")
    assert list(out.iterdir()) == []
    leftovers = [tmp_path / ".scores.jsonl.tmp-99", tmp_path / ".scores.jsonl.config.json.tmp-7"]
    for f in leftovers:                            # what a kill mid-write leaves: removed by the next run
        f.write_text("partial")
    eval_aime.main(["--data", str(problems), "--out", str(scores)], sampler=Sevens())   # free again
    assert not [f for f in leftovers if f.exists()] and scores.exists()


def test_eval_refuses_old_samples_once_the_weights_are_replaced_in_place(tmp_path, problems, tiny):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    weights, out = folder / "model.safetensors", tmp_path / "scores.jsonl"
    argv = ["--data", str(problems), "--model", str(folder), "--out", str(out)]
    eval_aime.main(argv, sampler=Sevens())
    stat = weights.stat()
    state = load_file(weights)
    save_file({k: v + 1 for k, v in state.items()}, weights, metadata={"format": "pt"})   # retrained in place:
    assert weights.stat().st_size == stat.st_size                                           # same size,
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))                      # another mtime
    with pytest.raises(SystemExit, match="model_fingerprint"):
        eval_aime.main(argv, sampler=Sevens())
    renamed = {k.replace("layers", "lay3rs"): v for k, v in state.items()}                 # same size, same mtime,
    save_file(renamed, weights, metadata={"format": "pt"})                                 # another header
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(SystemExit, match="model_fingerprint"):
        eval_aime.main(argv, sampler=Sevens())
    save_file(state, weights, metadata={"format": "pt"})                                   # the original back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert eval_aime.main(argv, sampler=Sevens())["metrics"]["pass@1"] == 1.0


def test_eval_writes_its_sidecar_only_once_the_model_loads(tmp_path, problems):
    out = tmp_path / "scores.jsonl"
    with pytest.raises((SystemExit, OSError), match="no such model folder"):
        eval_aime.main(["--data", str(problems), "--model", str(tmp_path / "typo"), "--out", str(out)])
    assert not Path(f"{out}.config.json").exists()
    eval_aime.main(["--data", str(problems), "--out", str(out)], sampler=Sevens())   # the --out is not blocked


def test_distill_resume_keeps_the_decontamination_sets(tmp_path, data_dir):
    first = json.loads((data_dir / "aime24.jsonl").read_text().splitlines()[0])
    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "copy", "problem": first["problem"], "answer": first["answer"]},
                                                  {"id": "ok", "problem": "ANSWER=5 What is 2+3?", "answer": 5}])
    argv = ["--problems", str(problems), "--api-model", "m", "--out", str(tmp_path / "t.jsonl")]
    with OpenAIServer() as server:
        distill.main(argv + ["--teacher", server.base_url, "--decontaminate", str(data_dir / "aime24.jsonl"),
                             "--samples-per-problem", "1"])
        assert len(server.requests) == 1
        with pytest.raises(SystemExit, match="decontaminate"):
            distill.main(argv + ["--teacher", server.base_url, "--samples-per-problem", "2"])
        assert len(server.requests) == 1            # the evaluation problem was never sent
        # the sampling flags distill.py shares with eval_aime.py change a trace too: a resume with one is refused
        with pytest.raises(SystemExit, match="top_k: None -> 5"):
            distill.main(argv + ["--teacher", server.base_url, "--decontaminate", str(data_dir / "aime24.jsonl"),
                                 "--top-k", "5"])
        assert len(server.requests) == 1


def test_kv_cache_takes_the_rows_that_fit_and_says_so(tiny, monkeypatch, capsys):
    sampler = LocalSampler(tiny, device="cpu", dtype="float32")
    requests = [Request(messages=[{"role": "user", "content": "Count."}], seed=s) for s in range(5)]
    params = SamplingParams(max_new_tokens=12, temperature=0.8)
    unlimited = dict(sampler.generate(requests, params))
    c = sampler.model.config
    max_len = len(sampler.prompt_ids(requests[0])) + 12
    per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * max_len * c.head_dim * 4   # fp32 keys and values
    monkeypatch.setattr(sample, "free_memory", lambda device: 2.5 * per_row / 0.8)
    capsys.readouterr()
    limited = dict(sampler.generate(requests, params))
    assert "decoding 2 rows at a time" in capsys.readouterr().err
    assert {i: c.text for i, c in limited.items()} == {i: c.text for i, c in unlimited.items()}
    monkeypatch.setattr(sample, "free_memory", lambda device: per_row / 2)
    with pytest.raises(SystemExit, match="lower --max-new-tokens"):
        list(sampler.generate(requests, params))


# ----------------------------------------------------------------------------- over-long prompts, endpoints

def test_an_over_long_problem_is_recorded_as_skipped(tmp_path, tiny):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "problem": "word " * 300, "answer": 1},
                                                  {"id": "short", "problem": "What is 1 + 1?", "answer": 2}])
    out = tmp_path / "scores.jsonl"
    summary = eval_aime.main(["--data", str(problems), "--model", str(tiny), "--out", str(out), "--samples", "2",
                              "--max-new-tokens", "3", "--device", "cpu"])
    rows = {(r["id"], r["sample"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 4 and summary["metrics"]["problems"] == 2
    assert [rows[("long", k)]["finish_reason"] for k in (0, 1)] == ["prompt_too_long"] * 2
    assert rows[("short", 0)]["finish_reason"] in ("stop", "length")
    traces = tmp_path / "t.jsonl"
    summary = distill.main(["--problems", str(problems), "--teacher", str(tiny), "--out", str(traces),
                            "--max-tokens", "3", "--device", "cpu", "--plain-ok"])
    rejected = [json.loads(line) for line in Path(f"{traces}.rejected.jsonl").read_text().splitlines()]
    assert {r["problem_id"]: r["flags"] for r in rejected}["long"] == ["prompt_too_long"]
    assert summary["missing"] == 0 and summary["counts"]["flags"]["prompt_too_long"] == 1


def test_an_endpoint_nobody_answers_at_or_an_unset_key_is_refused_at_once(tmp_path, problems):
    started = time.perf_counter()
    with pytest.raises(SystemExit, match="cannot connect"):
        sample.make_sampler(base_url=f"http://127.0.0.1:{dead_port()}/v1", api_model="m")
    assert time.perf_counter() - started < 5       # not minutes of retries
    with OpenAIServer() as server:
        with pytest.raises(SystemExit, match="NO_SUCH_KEY_VAR"):
            distill.main(["--problems", str(problems), "--teacher", server.base_url, "--api-model", "m",
                          "--out", str(tmp_path / "t.jsonl"), "--api-key-env", "NO_SUCH_KEY_VAR"])
        assert server.requests == []


# ----------------------------------------------------------------------------- loop.py

def test_loop_says_when_no_chain_is_kept_and_a_rerun_resumes(tmp_path, tiny, monkeypatch):
    student = tmp_path / "student"
    shutil.copytree(tiny, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))  # loop's --max-len

    def in_process(cmd, log):                      # loop's steps, run in this process (same argv)
        main = {"distill.py": distill.main, "sft.py": sft.main, "eval_aime.py": eval_aime.main,
                "tools/plot.py": lambda argv: None}[cmd[1]]
        main([str(c) for c in cmd[2:]])
        return 0.0
    monkeypatch.setattr(loop, "run", in_process)
    out = tmp_path / "loop"
    argv = ["--model", str(student), "--out", str(out), "--train", "2", "--heldout", "1", "--samples-per-problem", "1",
            "--max-tokens", "4", "--eval-samples", "2", "--epochs", "1", "--device", "cpu"]
    with pytest.raises(SystemExit, match="solved no training problem"):
        loop.main(argv)                            # a random model boxes no right answer
    rejected = Path(f"{out}/traces.jsonl.rejected.jsonl")
    row = json.loads(rejected.read_text().splitlines()[0])
    rejected.write_text("\n".join(rejected.read_text().splitlines()[1:]) + "\n")
    row.update(thinking="", solution=f"So \\boxed{{{row['answer']}}}.", accepted=True, flags=[], correct=True)
    write_jsonl(out / "traces.jsonl", [row])       # as if the teacher had solved one
    loop.main(argv)
    files = {p: p.read_bytes() for p in out.rglob("*")         # all but what each run rewrites: logs and summaries
             if p.is_file() and not p.name.endswith(("summary.json", ".log", "traces.jsonl.run.json", "report.json"))}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    loop.main(argv)                                # the same command again: every step resumes, nothing is redone
    assert {p: p.read_bytes() for p in files} == files
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == mtimes[out / "sft" / "model.safetensors"]
