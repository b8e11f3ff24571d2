"""sample.py: cached greedy equals recomputation (every family) and transformers' generate; batched
sampling equals one-by-one; the sampling distributions are right; budget forcing is exact.

    python -m pytest tests/test_sample.py -q
"""
import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, make_hf_model
from sample import (EndpointError, EndpointSampler, LocalSampler, Request, SamplingParams, filtered_probs,
                    make_sampler, sample_token)

FAMILIES = {"qwen2": dict(model_type="qwen2", n_head=4, n_kv=2, head_dim=16),
            "qwen3": dict(model_type="qwen3", n_head=2, n_kv=1, head_dim=32),
            "llama": dict(model_type="llama", n_head=3, n_kv=1, head_dim=16, tie=True)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_hf_model(root / name, tokenizer_from=smollm2_tokenizer, **kw) for name, kw in FAMILIES.items()}


def chat(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_recomputing_the_prefix(tiny_models, family):
    sampler = LocalSampler(tiny_models[family], device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=24, temperature=0)
    [(_, c)] = list(sampler.generate([Request(messages=chat("Count to ten."))], params))
    ids = torch.tensor([sampler.prompt_ids(Request(messages=chat("Count to ten.")))])
    out = []
    with torch.no_grad():
        for _ in range(c.num_tokens):
            t = sampler.model(ids)[0, -1].argmax().item()
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    ours = sampler.tok.encode(c.text) if c.finish_reason == "length" else None
    assert c.num_tokens == 24 or out[-1] in sampler.stop_ids
    assert sampler.tok.decode(out[:c.num_tokens - (c.finish_reason == "stop")]) == c.text
    if ours is not None:
        assert sampler.tok.decode(out) == c.text


def test_greedy_equals_transformers_generate(smollm2):
    import transformers
    sampler = LocalSampler(smollm2, device="cpu", dtype="float32")
    req = Request(messages=chat("Write a short poem about the sea."))
    [(_, c)] = list(sampler.generate([req], SamplingParams(max_new_tokens=64, temperature=0)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([sampler.prompt_ids(req)])
    ref = hf.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=sampler.tok.stop_ids, pad_token_id=2)
    ref_ids = ref[0, ids.shape[1]:].tolist()
    if ref_ids and ref_ids[-1] in sampler.stop_ids:
        ref_ids = ref_ids[:-1]
    assert c.text == sampler.tok.decode(ref_ids)


def test_batched_sampling_equals_one_by_one(tiny_models):
    sampler = LocalSampler(tiny_models["qwen2"], device="cpu", dtype="float32", batch_size=5)
    prompts = ["Hi", "Tell me a long story about a dragon and a knight.", "2+2="]
    reqs = [Request(messages=chat(p), seed=100 + 10 * i + j) for i, p in enumerate(prompts) for j in range(3)]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50)
    batched = dict(sampler.generate(reqs, params))            # 9 requests through 5 slots: refills happen
    sampler.batch_size = 1
    alone = {i: next(iter(sampler.generate([r], params)))[1] for i, r in enumerate(reqs)}
    assert batched == alone
    assert len({c.text for c in batched.values()}) > 3       # the seeds do make different samples


def test_compiled_decoding_equals_eager(tiny_models):
    """--compile (static cache, padded batch, CUDA graphs on GPU) writes the same tokens as eager, with
    refills and mixed prompt lengths, and a second call of another length reuses the graph."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = LocalSampler(tiny_models["qwen2"], device=device, dtype="float32", batch_size=3)
    compiled = LocalSampler(tiny_models["qwen2"], device=device, dtype="float32", batch_size=3, compile=True)
    reqs = [Request(messages=chat("word " * n), seed=n) for n in (1, 9, 4, 17, 2)]
    for params in (SamplingParams(max_new_tokens=12, temperature=0), SamplingParams(max_new_tokens=30, temperature=0.8)):
        assert dict(compiled.generate(reqs, params)) == dict(eager.generate(reqs, params))
    assert compiled.static_cache.max_len == 256  # both calls fit one power-of-two cache: one graph


def test_finished_rows_stop_costing_compute(tiny_models):
    sampler = LocalSampler(tiny_models["llama"], device="cpu", dtype="float32", batch_size=4)
    eos, orig, sizes = sampler.tok.stop_ids[0], sampler.model.forward, []
    def forward(ids, positions=None, cache=None, **kw):  # every row says end-of-turn at position 60
        logits = orig(ids, positions=positions, cache=cache, **kw)
        logits[:, -1, eos] += 1e4 * (positions[:, -1] >= 59)
        if ids.shape[1] == 1:
            sizes.append(ids.shape[0])
        return logits
    sampler.model.forward = forward
    reqs = [Request(messages=chat("word " * n)) for n in (1, 8, 16, 24)]   # so rows end at different steps
    lengths = [len(sampler.prompt_ids(r)) for r in reqs]
    out = dict(sampler.generate(reqs, SamplingParams(max_new_tokens=100, temperature=0)))
    assert [out[i].num_tokens for i in range(4)] == [60 - n + 1 for n in lengths]
    assert all(c.finish_reason == "stop" for c in out.values())
    assert sizes[0] == 4 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)  # the batch shrinks


# ----------------------------------------------------------------------------- distributions

CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # 99.9% quantiles


def draw(logits, params, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = logits.expand(500, -1)
    counts = Counter()
    for _ in range(n // 500):
        counts.update(sample_token(rows, params, [g] * 500).tolist())
    return counts, n


def expected(logits, params):
    p = (logits / params.temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    if params.top_k:
        keep[order[:params.top_k]] = True
    else:
        keep[:] = True
    if params.top_p < 1:
        mass, nucleus = 0.0, torch.zeros_like(keep)
        for i in order.tolist():
            if mass >= params.top_p:
                break
            nucleus[i], mass = True, mass + p[i].item()
        keep &= nucleus
    if params.min_p:
        keep &= p >= params.min_p * p.max()
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6),
                                    SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.8, top_p=0.8),
                                    SamplingParams(temperature=1.0, min_p=0.2), SamplingParams(temperature=1.3, top_k=4, top_p=0.9)])
def test_sampling_distribution(params):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0]])
    counts, n = draw(logits, params)
    q = expected(logits[0], params)
    support = [i for i in range(6) if q[i] > 0]
    assert set(counts) <= set(support), "sampled a token that the filter removed"
    chi2 = sum((counts[i] - n * q[i].item()) ** 2 / (n * q[i].item()) for i in support)
    assert chi2 < CHI2_999[len(support) - 1] if len(support) > 1 else counts[support[0]] == n


@pytest.mark.parametrize("temperature", [0.3, 50.0])  # a peaked nucleus (top-1024 path) and a flat one (full sort)
def test_nucleus_over_a_large_vocabulary(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 20000) * 4
    params = SamplingParams(temperature=temperature, top_p=0.9)
    probs = (logits / temperature).softmax(-1)
    want = torch.zeros_like(probs)
    for b in range(3):  # the definition, row by row, over the whole sorted vocabulary
        p, order = probs[b].sort(descending=True)
        n = int((p.cumsum(0) < 0.9).sum()) + 1
        want[b, order[:n]] = p[:n]
    assert torch.allclose(filtered_probs(logits, params), want)
    assert ((want > 0).sum(-1) > 1024).any() == (temperature > 1)


def test_greedy_is_argmax_and_seed_reproduces():
    logits = torch.randn(4, 100)
    assert torch.equal(sample_token(logits, SamplingParams(temperature=0), []), logits.argmax(-1))
    p = SamplingParams(temperature=1.0)
    a = sample_token(logits, p, [torch.Generator().manual_seed(s) for s in range(4)])
    b = sample_token(logits, p, [torch.Generator().manual_seed(s) for s in range(4)])
    assert torch.equal(a, b)
    assert len({sample_token(logits[:1], p, [torch.Generator().manual_seed(s)]).item() for s in range(50)}) > 1  # seeds differ


# ----------------------------------------------------------------------------- budget forcing

@pytest.fixture(scope="module")
def thinker(tmp_path_factory, smollm2):
    """A tiny model whose vocabulary has <think> and </think> as single tokens, as reasoning models do."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok
    folder = make_hf_model(tmp_path_factory.mktemp("think") / "m", vocab=49154, n_head=2, n_kv=1, head_dim=16,
                           tokenizer_from=smollm2)
    tok = HFTok.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def force_end_think_at(sampler, step):
    """Make the model want to write '</think>' from its `step`-th generated token on."""
    end, orig, start = sampler.think_end[0], sampler.model.forward, {}
    def forward(ids, positions=None, cache=None, **kw):
        logits = orig(ids, positions=positions, cache=cache, **kw)
        for b in range(ids.shape[0]):
            start.setdefault(b, positions[b, 0].item() + ids.shape[1])  # prefill: first generated position
            if positions[b, -1].item() + 1 - start[b] >= step:
                logits[b, -1, end] = 1e4
        return logits
    sampler.model.forward = forward


def test_max_think_tokens_forces_the_end_exactly(thinker):
    sampler = LocalSampler(thinker, device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, max_think_tokens=7)
    [(_, c)] = list(sampler.generate([Request(messages=chat("think"), seed=3)], params))
    ids = c.token_ids
    forced = sampler.tok.encode("\n") + sampler.think_end + sampler.tok.encode("\n\nFinal Answer: ")
    assert sampler.think_end[0] not in ids[:7] and ids[7:7 + len(forced)] == forced


def test_min_think_tokens_replaces_early_end_with_wait(thinker):
    sampler = LocalSampler(thinker, device="cpu", dtype="float32")
    force_end_think_at(sampler, 3)  # the model tries to stop thinking after 3 tokens
    params = SamplingParams(max_new_tokens=30, temperature=0, min_think_tokens=10)
    [(_, c)] = list(sampler.generate([Request(messages=chat("think"))], params))
    ids = c.token_ids
    end = sampler.think_end[0]
    assert ids.index(end) == 10, "thinking must last exactly min_think_tokens tokens"
    assert sampler.tok.decode(ids[:10]).count("Wait") >= 1
    # and without the budget it ends at 3
    sampler2 = LocalSampler(thinker, device="cpu", dtype="float32")
    force_end_think_at(sampler2, 3)
    [(_, c2)] = list(sampler2.generate([Request(messages=chat("think"))], SamplingParams(max_new_tokens=30, temperature=0)))
    assert c2.token_ids.index(end) == 3


# ----------------------------------------------------------------------------- bad input and the CLI

def test_bad_inputs(tiny_models, tmp_path):
    sampler = LocalSampler(tiny_models["qwen3"], device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="empty prompt"):
        list(sampler.generate([Request(prompt="")], SamplingParams()))
    with pytest.raises(ValueError, match="context is 256"):
        list(sampler.generate([Request(prompt="word " * 400)], SamplingParams()))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        make_sampler(model=tmp_path / "nope")
    down = EndpointSampler("http://127.0.0.1:9/v1", "m", max_attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError):
        list(down.generate([Request(messages=chat("hi"))], SamplingParams()))


def test_cli_json_and_errors(tiny_models):
    cmd = [sys.executable, str(REPO / "sample.py"), "--model", str(tiny_models["llama"]), "--prompt", "Hello",
           "--chat", "--num-samples", "3", "--max-new-tokens", "5", "--json", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(set(r) == {"index", "text", "num_tokens", "finish_reason"} for r in rows)
    assert "tokens/s" in out.stderr
    bad = subprocess.run(cmd[:2] + ["--model", "/nonexistent", "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no such model folder" in bad.stderr
    empty = subprocess.run(cmd[:4] + ["--prompt", " "], capture_output=True, text=True)
    assert empty.returncode != 0 and "empty" in empty.stderr
