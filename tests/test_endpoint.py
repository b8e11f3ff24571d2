"""EndpointSampler against a loopback server that misbehaves on purpose: retries, timeouts, dropped
connections, errors that must not be retried, reasoning formats, o-series parameters, the API key.

    .venv/bin/python -m pytest tests/test_endpoint.py -q
"""
import socket
import time

import pytest

from openai_server import Action, OpenAIServer, error, reply, user_text
from sample import EndpointError, EndpointSampler, Request, SamplingParams

FAST = dict(backoff=0.001, max_backoff=0.01)          # keep retry sleeps out of the test's runtime


def ask(*texts, system=None):
    msgs = lambda t: ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": t}]
    return [Request(messages=msgs(t), seed=i) for i, t in enumerate(texts)]


def run(sampler, requests, params=None, **kw):
    return dict(sampler.generate(requests, params or SamplingParams(max_new_tokens=64), **kw))


def attempts(server):
    return [r["attempt"] for r in server.requests]


def test_answers_and_reasoning_formats():
    with OpenAIServer() as server:
        out = run(EndpointSampler(server.base_url, "m", **FAST),
                  ask("7*8", "ANSWER=12 [[style:reasoning]]", "ANSWER=-3 [[style:plain]]"))
    assert "</think>" in out[0].text and "\\boxed{56}" in out[0].text and out[0].reasoning is None
    assert out[1].reasoning == "Let me think. Done." and "\\boxed{12}" in out[1].text
    assert out[1].usage["completion_tokens_details"]["reasoning_tokens"] == 4
    assert out[2].reasoning is None and "<think>" not in out[2].text and "\\boxed{-3}" in out[2].text
    assert all(c.finish_reason == "stop" and c.num_tokens == c.usage["completion_tokens"] for c in out.values())


def test_reasoning_field_spelled_reasoning():
    def responder(body, attempt):
        a = reply("\\boxed{1}")
        a.body["choices"][0]["message"]["reasoning"] = "thought"
        return a
    with OpenAIServer(responder) as server:
        assert run(EndpointSampler(server.base_url, "m"), ask("x"))[0].reasoning == "thought"


def test_truncated_answer_is_length():
    with OpenAIServer() as server:
        c = run(EndpointSampler(server.base_url, "m"), ask("[[length]]"))[0]
    assert c.finish_reason == "length" and "\\boxed" not in c.text and c.num_tokens > 0


def test_retries_on_5xx_and_dropped_connections():
    with OpenAIServer() as server:
        out = run(EndpointSampler(server.base_url, "m", concurrency=1, **FAST),
                  ask("ANSWER=1 [[fail:500,503]]", "ANSWER=2 [[fail:drop,drop]]", "ANSWER=3 [[fail:408,409]]"))
        assert attempts(server) == [1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert ["\\boxed{%d}" % (i + 1) in out[i].text for i in range(3)] == [True] * 3


def test_retry_after_is_honoured():
    def responder(body, attempt):
        return error(429, "slow down", {"Retry-After": "0.4"}) if attempt == 1 else reply("\\boxed{5}")
    with OpenAIServer(responder) as server:
        start = time.time()
        out = run(EndpointSampler(server.base_url, "m", backoff=0.001), ask("x"))
        elapsed = time.time() - start
        assert attempts(server) == [1, 2]
    assert 0.4 <= elapsed < 2.0 and "\\boxed{5}" in out[0].text


def test_hang_past_timeout_is_retried():
    with OpenAIServer(hang_s=1.5) as server:
        start = time.time()
        out = run(EndpointSampler(server.base_url, "m", timeout=0.3, **FAST), ask("ANSWER=9 [[fail:hang]]"))
        assert time.time() - start < 1.5 and attempts(server) == [1, 2]
    assert "\\boxed{9}" in out[0].text


def test_gives_up_after_max_attempts():
    with OpenAIServer() as server:
        with pytest.raises(EndpointError) as e:
            run(EndpointSampler(server.base_url, "m", max_attempts=3, **FAST), ask("[[fail:500,500,500,500]]"))
        assert attempts(server) == [1, 2, 3]
    assert e.value.status == 500 and e.value.attempts == 3 and "scripted failure 500" in str(e.value)


def test_400_is_not_retried():
    with OpenAIServer() as server:
        with pytest.raises(EndpointError) as e:
            run(EndpointSampler(server.base_url, "m", **FAST), ask("[[fail:400]]"))
        assert attempts(server) == [1]
    assert e.value.status == 400 and e.value.attempts == 1 and "scripted failure 400" in e.value.message


def test_errors_can_be_yielded():
    with OpenAIServer() as server:
        out = run(EndpointSampler(server.base_url, "m", **FAST), ask("7*8", "[[fail:404]]", "1+1"), errors="yield")
    assert isinstance(out[1], EndpointError) and out[1].status == 404
    assert "\\boxed{56}" in out[0].text and "\\boxed{2}" in out[2].text


def test_server_down_is_a_clear_error():
    with socket.socket() as s:                    # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError) as e:
        run(EndpointSampler(f"http://127.0.0.1:{port}/v1", "m", max_attempts=2, **FAST), ask("x"))
    assert e.value.status is None and "gave up after 2 attempts" in str(e.value)


def test_payload_for_chat_models():
    with OpenAIServer() as server:
        ep = EndpointSampler(server.base_url + "/", "qwen")
        run(ep, [Request(prompt="raw 1+1", seed=7)], SamplingParams(max_new_tokens=99, temperature=0.6, top_p=0.95))
        run(ep, ask("2+2", system="be brief"), SamplingParams(max_new_tokens=5, top_k=20, min_p=0.05))
        first, second = (r["body"] for r in server.requests)
        assert server.requests[0]["path"] == "/v1/chat/completions"
    assert first == {"model": "qwen", "messages": [{"role": "user", "content": "raw 1+1"}], "seed": 7,
                     "max_tokens": 99, "temperature": 0.6, "top_p": 0.95}
    assert second["messages"][0] == {"role": "system", "content": "be brief"}
    assert second["top_k"] == 20 and second["min_p"] == 0.05


def test_payload_for_o_series():
    with OpenAIServer() as server:
        run(EndpointSampler(server.base_url, "o3-mini"), ask("2+2", system="be brief"),
            SamplingParams(max_new_tokens=500, temperature=0.6, top_p=0.9, top_k=5))
        run(EndpointSampler(server.base_url, "my-reasoner", o_series=True), ask("3+3"))
        o3, flagged = (r["body"] for r in server.requests)
    assert o3 == {"model": "o3-mini", "seed": 0, "max_completion_tokens": 500,
                  "messages": [{"role": "user", "content": "be brief\n\n2+2"}]}
    assert "temperature" not in flagged and "max_completion_tokens" in flagged


def test_thinking_budgets_are_refused():
    with pytest.raises(ValueError, match="local models only"):
        run(EndpointSampler("http://127.0.0.1:1/v1", "m"), ask("x"), SamplingParams(max_think_tokens=10))


def test_api_key_only_in_authorization_header(monkeypatch, capsys):
    key = "sk-test-SECRET-4242"
    monkeypatch.setenv("TEST_KEY", key)

    def responder(body, attempt):                 # a server that echoes the key back, as some do
        auth = server.requests[-1]["headers"].get("Authorization", "")
        if "[[auth]]" in user_text(body):
            return error(401, f"Incorrect API key provided: {auth[7:]}")
        return error(503, f"overloaded, key {auth[7:]}") if attempt == 1 else reply("\\boxed{1}")

    with OpenAIServer(responder) as server:
        ep = EndpointSampler(server.base_url, "m", api_key_env="TEST_KEY", **FAST)
        with pytest.raises(EndpointError) as e:
            run(ep, ask("[[auth]]"))
        with pytest.raises(EndpointError) as e2:
            run(EndpointSampler(server.base_url, "m", api_key_env="TEST_KEY", max_attempts=1), ask("x"))
        run(ep, ask("y"))
        for r in server.requests:
            assert r["headers"]["Authorization"] == f"Bearer {key}"
            assert key not in str(r["body"]) and key not in r["path"]
            assert all(key not in v for k, v in r["headers"].items() if k != "Authorization")
    assert e.value.status == 401 and "Incorrect API key" in str(e.value)
    for err in (e.value, e2.value):
        assert key not in str(err) and key not in repr(err) and key not in str(err.args)
    assert key not in str(ep.describe())
    out = capsys.readouterr()
    assert key not in out.out and key not in out.err


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv("UNSET_KEY_FOR_TEST", raising=False)
    with OpenAIServer() as server:
        run(EndpointSampler(server.base_url, "m", api_key_env="UNSET_KEY_FOR_TEST"), ask("1+1"))
        assert "Authorization" not in server.requests[0]["headers"]


def test_concurrency_is_bounded():
    def responder(body, attempt):
        return Action(delay=0.1, body=reply("\\boxed{1}").body)
    with OpenAIServer(responder) as server:
        out = run(EndpointSampler(server.base_url, "m", concurrency=3), ask(*[f"q{i}" for i in range(12)]))
        assert server.max_in_flight == 3
    assert sorted(out) == list(range(12))


def test_stopping_early_leaves_no_queue():
    # a caller that stops after the first result (a token budget, Ctrl-C) must not keep paying for the rest
    def responder(body, attempt):
        return Action(delay=0.05, body=reply("\\boxed{1}").body)
    with OpenAIServer(responder) as server:
        gen = EndpointSampler(server.base_url, "m", concurrency=2).generate(ask(*"abcdefgh"), SamplingParams())
        next(gen)
        gen.close()
        time.sleep(0.2)
        assert len(server.requests) <= 3
