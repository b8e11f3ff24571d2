"""sft.py: the loss mask, dropping long rows, packing == one row at a time, loss and gradients equal to
transformers', memorising two rows, exact resume after SIGKILL, torchrun (2 processes, gloo) == one
process, output folders that transformers loads, a NaN stop that keeps the last checkpoint.
Tiny random models with the real SmolLM2 tokenizer, fp32 on CPU.

    python -m pytest tests/test_sft.py -q              (about a minute on 2 cores)
    python -m pytest tests/test_sft.py -q -m slow      (100 steps of SmolLM2-135M on real R1 chains)
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

import sft
from conftest import REPO, make_hf_model, write_jsonl
from model import Tokenizer, load_model

ROWS = [  # every input format, several turns, a system prompt
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is 4."}]},
    {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue, like the sky."}]},
    {"id": "t1", "problem": "What is 3 times 5?", "thinking": "Three fives are fifteen.",
     "solution": "The product is $\\boxed{15}$.", "answer": "15"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome."}]},
    {"id": "t2", "problem": "Is 7 prime?", "thinking": "7 has no divisors but 1 and 7.",
     "solution": "Yes: $\\boxed{1}$.", "answer": "1"},
    {"conversations": [{"from": "system", "value": "You count."}, {"from": "human", "value": "Count to five."},
                       {"from": "gpt", "value": "1, 2, 3, 4, 5."}]},
]
FAST = ["--chunk-size", "256"]  # the default chunking suits real widths; at hidden size 32 it would be 1 row per chunk


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", ROWS)


def examples_of(rows, folder):
    tok = Tokenizer(folder)
    return [sft.Example(*(torch.tensor(x, dtype=torch.int32) for x in sft.tokenize(sft.to_messages(r), tok)))
            for r in rows]


def loss_model(folder):
    return sft.LossModel(load_model(folder, dtype=torch.float32), torch.float32, chunk_size=64)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------- data

def test_loss_mask_is_the_last_assistant_turn_and_its_end_of_turn(smollm2):
    tok = Tokenizer(smollm2)
    messages = sft.to_messages(ROWS[3])
    ids, labels = sft.tokenize(messages, tok)
    assert len(ids) == len(labels) and labels[-1] == sft.IGNORE
    targets = [t for t in range(len(ids)) if labels[t] != sft.IGNORE]
    assert all(labels[t] == ids[t + 1] for t in targets)  # shifted: position t predicts token t + 1
    # token by token, the predicted tokens are exactly the last assistant turn plus <|im_end|>
    assert "".join(tok.decode([ids[t + 1]]) for t in targets) == "Rome.<|im_end|>"
    # and every other token is the prompt of the turns before it (earlier answers are context), as sampled
    predicted = {t + 1 for t in targets}
    assert [ids[i] for i in range(len(ids)) if i not in predicted] == tok.prompt(messages[:-1])[0]
    assert "Paris." in tok.decode(ids)


def test_trace_rows_render_as_designed(smollm2):
    import eval_aime
    messages = sft.to_messages({**ROWS[2], "thinking": " Three fives are fifteen.\n"})
    assert messages[0] == {"role": "user", "content": eval_aime.user_prompt(ROWS[2]["problem"])}
    assert messages[1]["content"] == "<think>\nThree fives are fifteen.\n</think>\n\nThe product is $\\boxed{15}$."
    assert sft.to_messages(ROWS[1])[1] == {"role": "assistant", "content": "Blue, like the sky."}


def test_long_rows_are_dropped_not_truncated(tmp_path, smollm2):
    tok = Tokenizer(smollm2)
    lengths = [len(sft.tokenize(sft.to_messages(r), tok)[0]) for r in ROWS]
    max_len = sorted(lengths)[3]
    examples, counts = sft.load_examples(write_jsonl(tmp_path / "d.jsonl", ROWS), tok, max_len)
    assert counts["too_long"] == sum(n > max_len for n in lengths) > 0
    assert counts["kept"] == len(examples) == sum(n <= max_len for n in lengths)
    assert sorted(len(e.ids) for e in examples) == sorted(n for n in lengths if n <= max_len)  # whole rows only


@pytest.mark.parametrize("bad", ['{"problem": "x"', '[1, 2]', '{"problem": "p", "thinking": "t", "solution": " "}',
                                 '{"text": "no known format"}',
                                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
                                 '{"conversations": [{"from": "robot", "value": "beep"}]}'])
def test_malformed_rows_name_their_line_or_are_skipped(tmp_path, smollm2, bad):
    tok = Tokenizer(smollm2)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + bad + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: "):
        sft.load_examples(path, tok, 10_000)
    examples, counts = sft.load_examples(path, tok, 10_000, skip_bad=True)
    assert (len(examples), counts["bad"], counts["rows"]) == (2, 1, 3)


def test_plan_covers_every_row_once_per_epoch_within_the_budget():
    class A:
        seed, epochs, max_steps, batch_tokens, grad_accum, pack = 3, 2, None, 100, 2, True
    lengths = [30, 70, 10, 100, 55, 45, 20, 80, 5]
    plan = sft.make_plan(lengths, A)
    for epoch in (0, 1):
        micro = [mb for e, _, step in plan if e == epoch for mb in step]
        assert sorted(i for mb in micro for i in mb) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in mb) <= 100 for mb in micro)
        assert len(micro) < len(lengths)  # something was packed
    assert [i for mb in plan[0][2] for i in mb] != [i for mb in plan[-1][2] for i in mb]  # reshuffled
    A.max_steps = 11
    assert len(sft.make_plan(lengths, A)) == 11  # runs past the epochs when asked


# ----------------------------------------------------------------------------- numerics

def test_packed_batch_equals_rows_one_by_one(tiny):
    examples = examples_of(ROWS[:4], tiny)
    lm = loss_model(tiny)
    batch = sft.collate(examples, [0, 1, 2, 3], "cpu")
    lengths = [len(e.ids) for e in examples]
    assert batch["positions"][0].tolist() == [p for n in lengths for p in range(n)]  # restart per document
    assert batch["cu_seqlens"].tolist() == [sum(lengths[:i]) for i in range(5)]
    packed = lm(**batch)
    packed.backward()
    g_packed = grads(lm)
    lm.zero_grad()
    alone = sum(lm(**sft.collate(examples, [i], "cpu")) for i in range(4))
    alone.backward()
    g_alone = grads(lm)
    assert torch.allclose(packed, alone, rtol=1e-5, atol=0), (packed.item(), alone.item())
    for name in g_alone:
        err = (g_packed[name] - g_alone[name]).abs().max() / g_alone[name].abs().max().clamp(min=1e-12)
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


def test_loss_is_a_mean_over_the_whole_step_not_per_micro_batch(tiny):
    """Two micro-batches of one step (gradient accumulation) == the same rows packed into one."""
    examples = examples_of(ROWS[:3], tiny)
    n = sum(e.targets for e in examples)
    one = sft.Dist(0, 1, torch.device("cpu"))
    results = []
    for micro in ([[0, 1, 2]], [[0], [1, 2]]):
        lm = loss_model(tiny)
        sgd = torch.optim.SGD(lm.parameters(), lr=1.0)  # new weights = old - gradient
        loss, _ = sft.train_step(lm, sgd, [sft.collate(examples, rows, "cpu") for rows in micro], n, one, 0)
        results.append((loss, lm.state_dict()))
    (l1, w1), (l2, w2) = results
    assert abs(l1 - l2) < 1e-6 * l1
    assert all((w1[k] - w2[k]).abs().max() < 1e-5 for k in w1)


@pytest.mark.parametrize("case", ["llama-untied", "qwen2-tied-bias"])
def test_loss_and_gradients_equal_transformers(tmp_path, smollm2, case):
    kw = dict(model_type="qwen2", tie=True) if case == "qwen2-tied-bias" else {}
    folder = make_hf_model(tmp_path / case, n_head=2, n_kv=1, head_dim=16, tokenizer_from=smollm2, **kw)
    ex = examples_of([ROWS[3]], folder)[0]
    batch = sft.collate([ex], [0], "cpu")
    lm = loss_model(folder)
    ours = lm(**batch) / ex.targets  # our sum over targets, as a mean: what transformers returns
    ours.backward()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers shifts internally: its label at t is the token at t itself, where that token is learned
    hf_labels = torch.cat([torch.tensor([[sft.IGNORE]]), batch["labels"][:, :-1]], dim=1)
    theirs = hf(input_ids=batch["ids"], labels=hf_labels).loss
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5 * theirs.item()
    hf_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in lm.model.named_parameters():
        g = hf_grads[name].grad
        err = (p.grad - g).abs().max() / g.abs().max()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
        checked += 1
    assert checked == len(list(hf.parameters()))  # tied: one parameter each


# ----------------------------------------------------------------------------- runs

def logits_ours_and_hf(folder, ids):
    with torch.no_grad():
        ours = load_model(folder, dtype=torch.float32).eval()(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
    return ours, theirs


@pytest.fixture(scope="module")
def memorised(tiny, tmp_path_factory):
    two = write_jsonl(tmp_path_factory.mktemp("two") / "two.jsonl", ROWS[:2])
    out = tmp_path_factory.mktemp("run") / "out"
    sft.main(["--data", str(two), "--model", str(tiny), "--out", str(out), "--max-steps", "50", "--lr", "1e-2",
              "--warmup-steps", "0", "--min-lr-ratio", "1", "--save-every", "0", "--eval-data", str(two), *FAST])
    return out, two


def test_a_tiny_run_memorises_two_rows(memorised, tiny):
    out, _ = memorised
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["eval_loss"] > 5
    assert metrics[-1]["step"] == 50 and metrics[-1]["loss"] < 0.01 and metrics[-1]["eval_loss"] < 0.01
    # greedy decoding from each prompt writes the answer back, token for token
    model, tok = load_model(out).eval(), Tokenizer(out)
    for row in ROWS[:2]:
        messages = sft.to_messages(row)
        ids = tok.prompt(messages[:-1])[0]
        answer = tok.encode(messages[-1]["content"]) + [tok.token_id("<|im_end|>")]
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in answer:
                x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
        assert x[0, len(ids):].tolist() == answer


def test_output_folder_loads_in_transformers_with_the_same_logits(memorised):
    out, data = memorised
    assert {"config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    ours, theirs = logits_ours_and_hf(out, torch.randint(0, 49152, (1, 40)))
    assert (ours - theirs).abs().max() < 1e-4
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"][0]["sha256"] == sft.sha256_file(data) and run["steps"] == 50
    assert run["final_loss"] < 0.01 and run["train_tokens"] > 0


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny, data, tmp_path):
    out = tmp_path / "out"
    # an absurd learning rate: step 1 is finite, its update blows the weights up, step 2 is not
    with pytest.raises(RuntimeError, match=r"step 2: loss .*The last good checkpoint is .*step-1"):
        sft.main(["--data", str(data), "--model", str(tiny), "--out", str(out), "--max-steps", "5", "--lr", "1e30",
                  "--warmup-steps", "0", "--grad-clip", "0", "--save-every", "1", "--no-pack", *FAST])
    assert (out / "step-1" / "trainer_state.pt").exists() and not (out / "config.json").exists()


def run_sft(*args, wait=True, **kw):
    cmd = [sys.executable, str(REPO / "sft.py"), *map(str, args), *FAST]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if wait:
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
    return proc


DETERMINISTIC = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "targets", "eval_loss")


def metrics(out):
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_resume_after_sigkill_is_exact(tiny, data, tmp_path):
    args = ["--data", data, "--model", tiny, "--max-steps", 16, "--save-every", 4, "--keep-last", 2, "--lr", "3e-3",
            "--batch-tokens", 100, "--max-len", 100, "--grad-accum", 2, "--eval-data", data, "--eval-every", 5]
    run_sft(*args, "--out", tmp_path / "whole")
    killed = run_sft(*args, "--out", tmp_path / "cut", wait=False)
    logged = tmp_path / "cut" / "metrics.jsonl"
    while not (logged.exists() and '"step": 10,' in logged.read_text()):  # past step-8, before step-12
        assert killed.poll() is None, killed.communicate()[0]
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "cut" / "config.json").exists()  # it really died mid-run
    assert [p.name for p in sft.checkpoints(tmp_path / "cut")] == ["step-4", "step-8"]
    run_sft(*args, "--out", tmp_path / "cut", "--resume")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "whole")
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "cut").state_dict()
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert [p.name for p in sft.checkpoints(tmp_path / "whole")] == ["step-8", "step-12"]


def test_torchrun_two_processes_equal_one(tiny, data, tmp_path):
    args = ["--data", data, "--model", tiny, "--max-steps", 6, "--save-every", 3, "--lr", "3e-3",
            "--batch-tokens", 100, "--max-len", 100, "--grad-accum", 2, "--eval-data", data]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, str(REPO / "sft.py"), *map(str, args), "--out", str(tmp_path / "two"), *FAST],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_sft(*args, "--out", tmp_path / "one")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(7))
    for r1, r2 in zip(one, two):
        for k in ("loss", "eval_loss", "grad_norm"):
            if k in r1:
                assert abs(r1[k] - r2[k]) <= 1e-4 * abs(r1[k]), (k, r1, r2)
    ids = torch.randint(0, 49152, (1, 40))
    for folder in (tmp_path / "two", tmp_path / "two" / "step-3"):  # final and checkpoint, written by rank 0
        ours, theirs = logits_ours_and_hf(folder, ids)
        assert (ours - theirs).abs().max() < 1e-4
    ours_one, _ = logits_ours_and_hf(tmp_path / "one", ids)
    assert (ours_one - logits_ours_and_hf(tmp_path / "two", ids)[0]).abs().max() < 1e-3


# ----------------------------------------------------------------------------- the real thing (slow)

@pytest.mark.slow
def test_100_steps_on_r1_chains_lower_the_held_out_loss(smollm2, traces_sample, tmp_path):
    """SmolLM2-135M-Instruct on real DeepSeek-R1 chains that fit in 1024 tokens: 100 steps of one row
    each, held-out loss on 24 other rows before and after. Several minutes on CPU."""
    tok = Tokenizer(smollm2)
    rows = [json.loads(l) for l in traces_sample.open()]
    short = [r for r in rows if len(sft.tokenize(sft.to_messages(r), tok)[0]) <= 1024]
    train, held_out = write_jsonl(tmp_path / "train.jsonl", short[24:]), write_jsonl(tmp_path / "eval.jsonl", short[:24])
    out = tmp_path / "out"
    sft.main(["--data", str(train), "--eval-data", str(held_out), "--out", str(out), "--max-steps", "100",
              "--max-len", "1024", "--no-pack", "--lr", "2e-5", "--warmup-steps", "10", "--save-every", "0"])
    records = [json.loads(l) for l in (out / "metrics.jsonl").open()]
    before, after = records[0]["eval_loss"], records[-1]["eval_loss"]
    print(f"held-out loss: {before:.4f} -> {after:.4f} ({len(short) - 24} train rows, 24 held out)")
    assert after < before - 0.02


def test_a_plain_trace_trains_on_its_solution_alone():
    row = {"problem": "What is 2+2?", "thinking": "", "solution": "2 + 2 = 4, so \\boxed{4}."}
    assert sft.to_messages(row)[1]["content"] == "2 + 2 = 4, so \\boxed{4}."
