"""A small OpenAI-compatible chat-completions server for tests, on loopback, that misbehaves on purpose.

Not a model server: answers are scripted. The tests of sample.py, eval_aime.py and distill.py start it
in-process (a daemon thread) and point a client at `server.base_url`:

    with OpenAIServer() as server:          # or OpenAIServer(responder=my_responder)
        EndpointSampler(server.base_url, "test-model").generate(...)

A responder is `responder(body: dict, attempt: int) -> Action`, where attempt counts how many times
this exact request body has been seen (1 on the first try), so failures can be scripted per request
and deterministically. The default responder reads markers in the last user message:
  ANSWER=123 (or a sum like "7*8")   the boxed answer to give
  [[fail:429,500,drop,hang]]         fail this way on attempts 1, 2, ..., then answer
  [[style:think|reasoning|plain]]    reasoning in <think> tags (default), in reasoning_content, or none
  [[length]]                         a truncated answer: finish_reason "length", no box
Every request is recorded in `server.requests` (path, headers, body, attempt).

    python tests/openai_server.py    # serve the default responder until Ctrl-C
"""
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Action:
    status: int = 200
    body: dict | None = None          # JSON to send; None with drop=False sends an empty object
    headers: dict = field(default_factory=dict)
    delay: float = 0.0                # sleep first (a hang, when longer than the client's timeout)
    drop: bool = False                # close the connection without any response


def reply(content, reasoning_content=None, finish_reason="stop", reasoning_tokens=None, model="test-model"):
    """A 200 chat completion. Token counts are word counts: good enough for tests."""
    message = {"role": "assistant", "content": content}
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    tokens = len(content.split()) + len((reasoning_content or "").split())
    usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10,
             "completion_tokens_details": {"reasoning_tokens": reasoning_tokens or 0}}
    return Action(body={"id": "chatcmpl-test", "object": "chat.completion", "model": model, "usage": usage,
                        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]})


def error(status, message, headers=None):
    return Action(status=status, body={"error": {"message": message, "type": "test", "code": status}},
                  headers=headers or {})


def user_text(body):
    users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users else ""


def scripted_answer(text):
    """ANSWER=123 if present, else the first sum / difference / product of integers, else "?"."""
    if m := re.search(r"ANSWER=(-?\d+)", text):
        return int(m.group(1))
    if m := re.search(r"(-?\d+)\s*([-+*])\s*(-?\d+)", text):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    return "?"


def default_responder(body, attempt, hang_s=2.0):
    text = user_text(body)
    fail = re.search(r"\[\[fail:([\w,]+)\]\]", text)
    if fail and attempt <= len(fail.group(1).split(",")):
        how = fail.group(1).split(",")[attempt - 1]
        if how == "drop":
            return Action(drop=True)
        if how == "hang":
            return Action(delay=hang_s, body=reply("too late \\boxed{0}").body)
        return error(int(how), f"scripted failure {how}", {"Retry-After": "0"} if how == "429" else {})
    if "[[length]]" in text:
        return reply("<think>Let me compute this very carefully, step by", finish_reason="length")
    final = f"The answer is $\\boxed{{{scripted_answer(text)}}}$."
    style = re.search(r"\[\[style:(\w+)\]\]", text)
    style = style.group(1) if style else "think"
    if style == "reasoning":
        return reply(final, reasoning_content="Let me think. Done.", reasoning_tokens=4)
    if style == "plain":
        return reply(final)
    return reply(f"<think>\nLet me think. Done.\n</think>\n\n{final}")


class OpenAIServer:
    def __init__(self, responder=None, hang_s=2.0):
        self.responder = responder or (lambda body, attempt: default_responder(body, attempt, hang_s))
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self._seen, self._lock = {}, threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True          # a hanging handler must not block shutdown
        self.httpd.owner = self
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        # poll every 50 ms, not 0.5 s: shutdown() waits for the next poll, and every test stops a server
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def attempt(self, path, headers, body):
        """Record the request; return how many times this exact body has been seen."""
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            self._seen[key] = self._seen.get(key, 0) + 1
            self.requests.append({"path": path, "headers": headers, "body": body, "attempt": self._seen[key]})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._seen[key]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        owner = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw or b"{}")
        attempt = owner.attempt(self.path, dict(self.headers), body)
        try:
            action = owner.responder(body, attempt) if self.path.endswith("/chat/completions") \
                else error(404, f"no route {self.path}")
            time.sleep(action.delay)
            if action.drop:
                self.close_connection = True      # BaseHTTPRequestHandler closes the socket after us
                return
            data = json.dumps(action.body or {}).encode()
            self.send_response(action.status)
            for name, value in {"Content-Type": "application/json", **action.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the client gave up (timeout): nothing to answer
        finally:
            with owner._lock:
                owner.in_flight -= 1

    def log_message(self, *args):                 # keep test output clean
        pass


if __name__ == "__main__":
    with OpenAIServer() as server:
        print(f"serving on {server.base_url}  (Ctrl-C to stop)")
        threading.Event().wait()
