"""Sampling from a local model folder or an OpenAI-compatible endpoint, behind one interface.

    python sample.py --model checkpoints/smollm2-135m-instruct --chat --prompt "What is 7*8?"
    python sample.py --model DIR --chat --prompt "..." --temperature 0.6 --num-samples 4 --json
    python sample.py --base-url https://api.deepseek.com/v1 --api-model deepseek-reasoner --chat --prompt "..."

Reading order: the request/completion types; the local sampler (prefill once per prompt, decode a
batch one token at a time into a preallocated KV cache, refill or drop finished rows, budget
forcing); the endpoint client (same generate() over HTTP); the command line.
"""
import http.client, inspect, json, os, random, socket, sys, time, urllib.error, urllib.parse, urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from itertools import groupby, islice
from pathlib import Path

import torch

import model
from model import ANSWER_CUE, KVCache, UserError, json_object, number


@dataclass
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 0.6        # 0 means greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0                  # 0 means off
    min_p: float = 0.0
    max_think_tokens: int | None = None   # s1 budget forcing: force "</think>" after N thinking tokens
    min_think_tokens: int | None = None   # replace an earlier "</think>" with "Wait"


@dataclass
class Request:
    """One completion to produce. Exactly one of messages (chat, rendered with the model's
    template) or prompt (raw text, no template) is set. seed makes the completion reproducible
    on its own, whatever else shares its batch."""
    messages: list[dict] | None = None
    prompt: str | None = None
    seed: int = 0

    @classmethod
    def user(cls, text, seed=0, raw=False, system=None):
        """One user turn: the text as it is with raw (no chat template), else a chat, after a system turn if given."""
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return cls(prompt=text, seed=seed) if raw else cls(messages=turns, seed=seed)


@dataclass
class Completion:
    text: str                       # what the model wrote (for local reasoning models this includes <think>...</think>)
    num_tokens: int                 # completion tokens
    finish_reason: str              # "stop" (stop token / end of turn) or "length" (hit max_new_tokens)
    reasoning: str | None = None    # endpoint only: reasoning_content / reasoning when the server returns it
    usage: dict = field(default_factory=dict)   # endpoint usage object as returned (incl. reasoning_tokens)
    token_ids: list[int] | None = None          # local only: the generated ids, stop token included
    opened: str = ""                # local only: the reply's start the prompt already wrote ("<think>\n" of R1-Distill)


# ---- Local model: admit rows (one prefill per prompt), step, retire, decode one token ----

class PromptTooLong(ValueError):
    """A prompt that fills the model's context. generate(errors="yield") yields it for that request
    alone, so that eval_aime.py and distill.py record the request as skipped and carry on."""


def sample_token(logits, params, generators):
    """logits (B, V) fp32 -> next token ids (B,). temperature 0 is argmax. Otherwise an exact draw
    from the filtered distribution by inverting its CDF at one uniform number per row. Each row's
    number comes from its own (CPU) torch.Generator, so a row's tokens depend only on its seed, never
    on which other rows share the batch; and a batch costs one cumsum and one search, not B draws of V."""
    if params.temperature == 0:
        return logits.argmax(-1)
    cdf = filtered_probs(logits, params).double().cumsum(-1)                           # (B, V)
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators]).to(logits.device)  # (B,)
    # the first token whose cumulative mass exceeds u * total (u in [0, 1)); a token of zero mass never qualifies
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


def filtered_probs(logits, params):
    """Temperature, then top-k, min-p and top-p (nucleus) filtering. -> unnormalized probs (B, V)."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)                                                          # (B, V)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0)
    if params.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        # (a token is out when the mass before it already does). Sorting the whole vocabulary is the slow
        # part; the nucleus almost always lies in the top 1024 tokens, and when their mass reaches top_p
        # that is exactly the same set
        top, order = probs.topk(min(1024, probs.shape[-1]), dim=-1)                     # (B, k)
        nucleus = torch.zeros_like(probs).scatter(-1, order, top.masked_fill(top.cumsum(-1) - top >= params.top_p, 0))
        for b in (top.sum(-1) < params.top_p).nonzero().flatten().tolist():             # rows whose nucleus is wider
            p, idx = probs[b].sort(descending=True)                                     # (V,)
            nucleus[b] = torch.zeros_like(p).scatter(0, idx, p.masked_fill(p.cumsum(0) - p >= params.top_p, 0))
        probs = nucleus
    return probs


class Row:
    """One completion in flight: which request, its random stream, what it has written so far."""
    def __init__(self, index, request, prompt, opened=""):
        self.index, self.prompt, self.opened = index, tuple(prompt), opened
        self.generator = torch.Generator().manual_seed(request.seed)  # CPU: it draws one number per step
        # the generated ids (forced ones included); ids to emit next instead of sampling (budget forcing);
        # True until "</think>" appears (budgets count the tokens before it)
        self.tokens, self.forced, self.thinking = [], [], True

    @property
    def position(self):  # where the next token's key and value go in the cache
        return len(self.prompt) + len(self.tokens)


class LocalSampler:
    """Batched decoding of a model folder with a preallocated KV cache. Requests that share a prompt
    share one prefill (its cache is copied to their rows). Finished rows are refilled with waiting
    requests; when none are left, the batch shrinks, so no compute goes to finished rows."""

    def __init__(self, model_dir, device="auto", dtype="auto", batch_size=64, compile=False, chat_template_kwargs=None):
        self.device = model.pick_device(device)
        self.dtype = model.pick_dtype(dtype, self.device)
        self.model_dir, self.batch_size, self.compile, self.static_cache = Path(model_dir), batch_size, compile, None
        self.model = model.load_model(model_dir, self.device, self.dtype).eval()
        self.tok = model.Tokenizer(model_dir)
        self.template_kwargs = dict(chat_template_kwargs or {})  # e.g. Qwen3's {"enable_thinking": false}
        self.stop_ids, self.think_end = set(self.tok.stop_ids), self.tok.encode("</think>")
        # --compile: one static-shape graph of the decode step; on CUDA replayed as a CUDA graph
        # ("reduce-overhead"), which removes the per-kernel launch cost that dominates small batches.
        mode = "reduce-overhead" if self.device.startswith("cuda") else None
        self.decode_step = torch.compile(self.model, dynamic=False, mode=mode) if compile else self.model

    def describe(self):
        manifest = self.model_dir / "run.json"
        return {"kind": "local", "model": str(self.model_dir.resolve()), "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size, "compile": self.compile,
                "chat_template_kwargs": self.template_kwargs,
                "manifest": json.loads(manifest.read_text()) if manifest.exists() else None}

    def prompt_ids(self, request):
        return self.prompt(request)[0]

    def prompt(self, request):
        """-> (ids, the reply's start the chat template already wrote, e.g. "<think>\\n")."""
        if (request.messages is None) == (request.prompt is None):
            raise ValueError("a Request needs exactly one of messages or prompt")
        ids, opened = (self.tok.prompt(request.messages, **self.template_kwargs) if request.messages
                       else (self.tok.encode(request.prompt), ""))
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= (limit := self.model.config.max_position_embeddings):
            raise PromptTooLong(f"prompt has {len(ids)} tokens; the model's context is {limit}")
        return ids, opened

    @torch.no_grad()
    def generate(self, requests, params, on_token=None, errors="raise"):
        """The sampling contract, shared with EndpointSampler.generate: yield (index, Completion) as each
        request finishes. on_token(index, token_id) streams. With errors="yield", a prompt too long for
        the context yields (index, PromptTooLong) instead. `requests` is read whole, up front: it batches.
        Each round: admit waiting rows into free slots, step (every row's next token), retire the rows
        that finished, decode one token for the rest."""
        if params.min_think_tokens is not None and len(self.think_end) != 1:
            raise ValueError("--min-think-tokens needs '</think>' to be one token in this vocabulary")
        groups = {}  # prompt ids -> the rows of every request with that prompt: identical prompts prefill once
        for i, r in enumerate(requests):
            try:
                ids, opened = self.prompt(r)
            except PromptTooLong as e:
                if errors == "raise":
                    raise
                yield i, e
            else:
                groups.setdefault(tuple(ids), []).append(Row(i, r, ids, opened))
        waiting = [row for group in groups.values() for row in group]  # the rows of one prompt side by side
        if not waiting:
            return
        max_len = min(self.model.config.max_position_embeddings, max(map(len, groups)) + params.max_new_tokens)
        cache = self.cache(min(self.batch_size, len(waiting)), max_len)  # fewer rows if memory is short
        rows, logits = [], torch.empty(0, self.model.config.vocab_size, device=self.device)
        while waiting or rows:
            logits = self.admit(waiting, rows, cache, logits)
            for slot, reason in self.step(rows, logits, params, max_len, on_token):
                yield self.retire(rows, slot, reason, cache)
            logits = self.decode(rows, cache) if rows else logits[:0]  # (B, V); (0, V) once every row finished

    def admit(self, waiting, rows, cache, logits):
        """Move waiting rows into the free slots. Each prompt among them runs once into a scratch cache,
        which is copied to its rows. -> logits (B, V)"""
        admitted = waiting[:cache.batch_size - len(rows)]
        del waiting[:len(admitted)]
        for prompt, group in groupby(admitted, key=lambda row: row.prompt):
            group = list(group)
            scratch = KVCache(self.model.config, 1, len(prompt), self.device, self.dtype)
            ids, positions = torch.tensor([prompt, range(len(prompt))], device=self.device)[:, None]   # (1, P) each
            first = self.model(ids, cache=scratch, positions=positions)[0, -1].float()                 # (V,)
            cache.write(slice(len(rows), len(rows) + len(group)), scratch)
            rows += group
            logits = torch.cat([logits, first.expand(len(group), -1)])
        return logits

    def step(self, rows, logits, params, max_len, on_token):
        """Every row's next token: sampled, then budget forcing (s1): past max_think_tokens the row is made
        to close its thinking; before min_think_tokens a "</think>" becomes "Wait". Thinking is what a row
        writes before its first "</think>" (prompts that open "<think>" count as such); a forced sequence
        runs to its end. -> [(slot, "stop" or "length")] of the rows that finished, the last slot first."""
        sampled, finished = sample_token(logits, params, [r.generator for r in rows]).tolist(), []
        for slot, (row, t) in enumerate(zip(rows, sampled)):
            thinking = row.thinking and not row.forced
            if thinking and params.max_think_tokens is not None and len(row.tokens) >= params.max_think_tokens:
                row.forced = self.tok.encode("\n") + self.think_end + self.tok.encode("\n\n" + ANSWER_CUE)
            elif thinking and [t] == self.think_end and len(row.tokens) < (params.min_think_tokens or 0):
                row.forced = self.tok.encode("Wait")
            t = row.forced.pop(0) if row.forced else t
            row.tokens.append(t)
            if on_token:
                on_token(row.index, t)
            row.thinking = row.thinking and row.tokens[-len(self.think_end):] != self.think_end
            stop = t in self.stop_ids and not row.forced
            if stop or len(row.tokens) >= params.max_new_tokens or row.position >= max_len:
                finished.append((slot, "stop" if stop else "length"))
        return finished[::-1]  # the last slot first: then the row that moves into a freed slot has not finished

    def retire(self, rows, slot, reason, cache):
        """A finished row leaves; the last row moves into its slot (cache included). -> (index, Completion)"""
        row, last = rows[slot], rows.pop()
        if slot < len(rows):
            cache.copy_rows(len(rows), [slot], last.position)
            rows[slot] = last
        text = self.tok.decode(row.tokens[:-1] if reason == "stop" else row.tokens)  # the stop token is not text
        return row.index, Completion(text, len(row.tokens), reason, token_ids=row.tokens, opened=row.opened)

    def decode(self, rows, cache):
        """One token for every row, each at its own position. -> logits (B, V)"""
        if self.compile:  # static shapes: every slot, the whole cache (free slots decode junk at 0)
            pad, cache.rows, cache.length = [0] * (cache.batch_size - len(rows)), cache.batch_size, None
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        else:  # the rows in use, up to the furthest position written
            pad, cache.rows, cache.length = [], len(rows), max(r.position for r in rows)
        ids = torch.tensor([r.tokens[-1] for r in rows] + pad, device=self.device)[:, None]          # (B, 1)
        positions = torch.tensor([r.position - 1 for r in rows] + pad, device=self.device)[:, None]  # (B, 1)
        logits = self.decode_step(ids, positions=positions, cache=cache)[:len(rows), -1].float()    # (B, V)
        return logits.clone() if self.compile else logits  # a CUDA graph's output is overwritten by its next replay

    def cache(self, B, max_len):
        """A cache of at most B rows, as many as fit in 80% of the free memory at max_len positions each.
        The cache is allocated whole, up front: 64 samples of SmolLM2-135M at its 8,192-token context
        take 24 GB. Fewer rows at a time give the same completions (each row has its own seed), only
        later; say so, and refuse when not even one row fits.
        A fresh cache, or under --compile one static cache kept across calls: a new shape or a new
        buffer address would mean a new graph. Its length is rounded up to a power of two so that
        calls of similar length share one graph (stale entries past a row's position are masked)."""
        c = self.model.config
        if self.compile:
            max_len = min(c.max_position_embeddings, 1 << max(8, (max_len - 1).bit_length()))
        per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * max_len * c.head_dim * self.dtype.itemsize
        free = free_memory(self.device)
        if self.static_cache is not None:  # about to be replaced: its memory counts as free
            free += sum(b.numel() * b.element_size() for b in self.static_cache.k + self.static_cache.v)
        fit = min(B, int(0.8 * free // per_row))
        if fit < 1:
            raise UserError(f"a KV cache of {max_len} positions takes {per_row / 1e9:.2f} GB per sample and "
                            f"{free / 1e9:.2f} GB are free: lower --max-new-tokens")
        if fit < B:
            print(f"sample.py: a KV cache of {B} rows x {max_len} positions would take {B * per_row / 1e9:.1f} GB, "
                  f"{free / 1e9:.1f} GB are free: decoding {fit} rows at a time", file=sys.stderr)
        if not self.compile:
            return KVCache(c, fit, max_len, self.device, self.dtype)
        if self.static_cache is None or self.static_cache.batch_size != fit or self.static_cache.max_len < max_len:
            self.static_cache = None  # free the old one first
            self.static_cache = KVCache(c, fit, max_len, self.device, self.dtype)
            for buf in self.static_cache.k + self.static_cache.v:
                torch._dynamo.mark_static_address(buf)
        return self.static_cache


def free_memory(device):
    """Bytes that may still be allocated on the device (CPU: the kernel's MemAvailable)."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")  # not Linux: no way to tell, no cap


# ---- OpenAI-compatible endpoint ----
# The same generate/describe interface over any server that speaks the chat-completions protocol
# (OpenAI, DeepSeek, vLLM, SGLang, llama.cpp). Standard library only: urllib + a thread pool.

class EndpointError(Exception):
    """A request that failed for good: a non-retryable status, or retries exhausted. status is the
    HTTP status (None for connection errors and timeouts, 200 for a malformed reply)."""

    def __init__(self, message, status=None, attempts=1):
        super().__init__(message)
        self.status, self.message, self.attempts = status, message, attempts


class EndpointSampler:
    """Chat completions from an OpenAI-compatible endpoint, at most `concurrency` requests in flight.

    A Request with `prompt` (raw text) is sent as a single user message: chat endpoints have no
    template-free mode. o-series models (o1/o3/o4...) get max_completion_tokens, no temperature /
    top_p / top_k, and any system message folded into the first user turn, because they reject those.
    Connection errors, timeouts, 408/409/429 and 5xx are retried with exponential backoff and jitter
    (or after the server's Retry-After) up to max_attempts; any other status fails at once with an
    EndpointError carrying the server's message. The API key is read once from the environment
    variable `api_key_env`; without it no Authorization header is sent (fine for local servers).
    It is never put in an error message: a server that echoes it back has it scrubbed."""

    def __init__(self, base_url, api_model, concurrency=8, api_key_env="OPENAI_API_KEY", timeout=600.0,
                 max_attempts=6, backoff=1.0, max_backoff=60.0, o_series=None, chat_template_kwargs=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.api_model, self.concurrency, self.timeout = base_url, api_model, concurrency, timeout
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.o_series = api_model.startswith(("o1", "o3", "o4")) if o_series is None else o_series
        self.api_key_env, self._key = api_key_env, os.environ.get(api_key_env) or None
        self.template_kwargs = dict(chat_template_kwargs or {})

    def describe(self):
        return {"kind": "endpoint", "base_url": self.base_url, "api_model": self.api_model, "o_series": self.o_series,
                "concurrency": self.concurrency, "timeout": self.timeout, "max_attempts": self.max_attempts,
                "api_key_env": self.api_key_env, "chat_template_kwargs": self.template_kwargs}

    def generate(self, requests, params, on_token=None, errors="raise"):
        """The sampling contract (LocalSampler.generate's): yield (index, Completion) as each request
        finishes, in any order. With errors="yield", a request that failed for good yields (index,
        EndpointError) instead of raising. on_token is never called: an endpoint returns whole answers.
        `requests` is read lazily (see below), so a caller may stop producing them."""
        if params.max_think_tokens is not None or params.min_think_tokens is not None:
            raise ValueError("thinking budgets need token-level control: local models only")
        todo, pool, pending = iter(enumerate(requests)), ThreadPoolExecutor(self.concurrency), {}
        try:
            while True:
                # Submit lazily, never more than `concurrency` ahead: a caller that stops early
                # (budget reached, Ctrl-C) leaves no queue of requests still to be paid for.
                for i, req in islice(todo, self.concurrency - len(pending)):
                    pending[pool.submit(self._complete, req, params)] = i
                if not pending:
                    return
                for fut in wait(pending, return_when=FIRST_COMPLETED).done:
                    i, error = pending.pop(fut), fut.exception()  # fut.result() raises what the request raised
                    yield i, (error if errors == "yield" and isinstance(error, EndpointError) else fut.result())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _payload(self, req, params):
        turns = [{"role": "user", "content": req.prompt}] if req.messages is None else [dict(m) for m in req.messages]
        body = {"model": self.api_model, "messages": turns, "seed": req.seed}
        if self.o_series:
            return {**body, "messages": _fold_system(turns), "max_completion_tokens": params.max_new_tokens}
        # not OpenAI's, sent only when set: vLLM / SGLang accept them (chat_template_kwargs: for the model's template)
        extras = {"top_k": params.top_k, "min_p": params.min_p, "chat_template_kwargs": self.template_kwargs}
        return {**body, "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                **{k: v for k, v in extras.items() if v}}

    def _complete(self, req, params):
        """One request with retries: connection errors, timeouts, 408/409/429 and 5xx are asked again after
        exponential backoff with jitter, or after the server's Retry-After; other statuses fail at once."""
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self._key}"} if self._key else {})
        request = urllib.request.Request(self.url, json.dumps(self._payload(req, params)).encode(), headers)  # with data: a POST
        for attempt in range(1, self.max_attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return self._parse(resp.read(), attempt)  # its EndpointError is not caught below
            except urllib.error.HTTPError as e:
                message, status, retry_after = self.scrub(_error_message(e)), e.code, _retry_after(e.headers)
                if status not in (408, 409, 429) and status < 500:  # those and every 5xx are retried
                    raise EndpointError(f"HTTP {status} from {self.url}: {message}", status, attempt) from None
                error = f"HTTP {status}: {message}"
            except (OSError, http.client.HTTPException) as e:
                # connection refused / reset / dropped, timeouts (socket.timeout is an OSError), short reads
                error, status, retry_after = self.scrub(f"{type(e).__name__}: {e}"), None, None
            if attempt == self.max_attempts:
                raise EndpointError(f"gave up after {attempt} attempts: {error}", status, attempt)
            time.sleep(retry_after if retry_after is not None else
                       min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5))

    def _parse(self, raw, attempt):
        """A chat-completions reply -> Completion. Reasoning comes from reasoning_content (DeepSeek, vLLM)
        or reasoning (OpenRouter, newer vLLM); <think> tags in the content are left in the text."""
        try:
            reply = json.loads(raw)
            message = reply["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"malformed reply from {self.url} (no JSON with choices[0].message): "
                                f"{self.scrub(raw[:200].decode(errors='replace'))}", 200, attempt) from None
        usage = reply.get("usage") or {}
        return Completion(text=message.get("content") or "", num_tokens=int(usage.get("completion_tokens") or 0),
                          finish_reason=reply["choices"][0].get("finish_reason") or "unknown", usage=usage,
                          reasoning=message.get("reasoning_content") or message.get("reasoning") or None)

    def scrub(self, text):
        """The API key out of any text we show or write (a server may echo it back)."""
        return text.replace(self._key, "[api key]") if self._key else text


def _fold_system(messages):
    """o-series reject system messages: prepend their text to the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if system and (user := next((m for m in rest if m["role"] == "user"), None)):
        user["content"] = f"{system}\n\n{user['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def _error_message(e):
    """The server's own error text: {"error": {"message": ...}} in OpenAI's format, else the raw body."""
    try:
        raw = e.read().decode(errors="replace")
        err = json.loads(raw).get("error", raw)
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except OSError:  # the body could not be read
        return e.reason or ""
    except (ValueError, AttributeError):  # not JSON, or not an object
        return raw[:500]


def _retry_after(headers):
    """Retry-After in seconds (the HTTP-date form is ignored: backoff applies instead)."""
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


# ---- One interface, and the command line ----

def make_sampler(model=None, base_url=None, api_model=None, device="auto", dtype="auto", batch_size=64,
                 concurrency=8, api_key_env=None, timeout=600.0, compile=False, chat_template_kwargs=None):
    """A LocalSampler for a model folder, or an EndpointSampler for an OpenAI-compatible URL. A key
    variable that is named but unset, or an endpoint nobody answers at, is refused here, at once,
    rather than after minutes of retries. api_key_env None: $OPENAI_API_KEY if set, else no key."""
    if (model is None) == (base_url is None):
        raise ValueError("give exactly one of a model folder (--model) or an endpoint (--base-url)")
    if model is not None:
        return LocalSampler(model, device, dtype, batch_size, compile, chat_template_kwargs)
    if not api_model:
        raise ValueError("--base-url needs --api-model (the model name the server expects)")
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set")
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"{base_url}: not an http(s):// URL")
    # connect once to the endpoint's host, or to the proxy urllib would use for it
    proxy = urllib.request.getproxies().get(url.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname) else url
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:  # a timeout has no strerror: its text is "timed out"
        raise UserError(f"{base_url}: cannot connect to {host}:{port} ({e.strerror or e}): is the server up?") from None
    return EndpointSampler(base_url, api_model, concurrency=concurrency, timeout=timeout,
                           api_key_env=api_key_env or "OPENAI_API_KEY", chat_template_kwargs=chat_template_kwargs)


def sampler_from_args(args):
    """make_sampler with the flags of add_sampling_args (and --model), as sample, eval_aime and distill parse
    them: make_sampler's parameters are named after those flags."""
    with model.user_errors():
        return make_sampler(**{k: getattr(args, k) for k in inspect.signature(make_sampler).parameters})


def add_sampling_args(p, temperature=0.6, top_p=1.0, max_new_tokens=1024, timeout=600.0, distill=False):
    """The flags every script that samples shares (sample.py, eval_aime.py, distill.py). distill.py names
    the model or URL --teacher (no --base-url) and the length limit --max-tokens (--max-new-tokens too)."""
    p.add_argument("--temperature", type=number(0, kind=float), default=temperature, help="0 means greedy")
    p.add_argument("--top-p", type=number(0, 1, float, above=True), default=top_p, help="nucleus sampling mass")
    p.add_argument("--top-k", type=number(0), default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=number(0, 1, float), default=0.0, help="keep tokens >= min_p x the top probability")
    p.add_argument(*(["--max-tokens", "--max-new-tokens"] if distill else ["--max-new-tokens"]), dest="max_new_tokens",
                   metavar="N", type=number(1), default=max_new_tokens, help="at most N tokens, reasoning included")
    p.add_argument("--max-think-tokens", type=number(0), help="force '</think>' + answer cue after N thinking tokens")
    p.add_argument("--min-think-tokens", type=number(0), help="replace an earlier '</think>' by 'Wait' (local models)")
    p.add_argument("--seed", type=int, default=0, help="completion j of a prompt uses seed + j")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="local models")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="local models")
    p.add_argument("--batch-size", type=number(1), default=64, help="rows decoded at once (fewer if memory is short)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (local models): static "
                   "shapes, a CUDA graph on GPU (11x eager at batch 1 on an H100); compiling takes a minute")
    p.add_argument("--chat-template-kwargs", type=json_object, default={}, metavar="JSON", help="chat template "
                   "keywords, e.g. '{\"enable_thinking\": false}' (Qwen3); sent as chat_template_kwargs (vLLM, SGLang)")
    if not distill:
        p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", help="model name at the endpoint (o1/o3/o4... are sent no temperature or top-p)")
    p.add_argument("--api-key-env", help="variable holding the API key (default: OPENAI_API_KEY if set, else none)")
    p.add_argument("--concurrency", type=number(1), default=8, help="requests in flight (endpoints)")
    p.add_argument("--timeout", type=number(0, kind=float, above=True), default=timeout,
                   help="seconds per request (endpoints): a timed-out request is paid for and asked again")


def sampling_params(args):
    """The SamplingParams of add_sampling_args' flags: its fields are named after them."""
    return SamplingParams(**{f.name: getattr(args, f.name) for f in fields(SamplingParams)})


def main(argv=None):
    p = model.ArgumentParser(description="Sample completions from a model folder or an OpenAI-compatible endpoint.")
    p.add_argument("--model", help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--num-samples", type=number(1), default=1, help="completions of the prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_sampling_args(p)
    args = p.parse_args(argv)
    if not args.prompt.strip():
        p.error("--prompt is empty")
    sampler = sampler_from_args(args)
    # completion j gets seed + j (the --seed contract of this command; eval_aime and distill hash theirs); an endpoint
    # sends a raw prompt as the user turn, as --chat does
    requests = [Request.user(args.prompt, args.seed + j, raw=not args.chat) for j in range(args.num_samples)]
    stream = not args.json and args.num_samples == 1 and args.temperature == 0 and args.base_url is None
    shown, printed = [], 0
    def on_token(i, t):  # print the text as it grows; decode the whole tail so multi-byte characters come out whole
        nonlocal printed
        if t not in sampler.stop_ids:
            shown.append(t)
            text = sampler.tok.decode(shown)
            if not text.endswith("\ufffd"):
                print(text[printed:], end="", flush=True)
                printed = len(text)
    started, tokens = time.perf_counter(), 0
    try:  # (sorted: by index; the one streamed completion has printed its text by the time it comes out)
        for i, c in sorted(sampler.generate(requests, sampling_params(args), on_token=on_token if stream else None)):
            tokens += c.num_tokens
            if args.json:
                print(json.dumps({"index": i, **{k: getattr(c, k) for k in ("text", "num_tokens", "finish_reason")}}))
            elif stream:
                print()
            else:
                print(f"--- completion {i} ({c.num_tokens} tokens, {c.finish_reason})\n{c.text}")
    except (ValueError, EndpointError) as e:
        raise UserError(str(e)) from None
    seconds = time.perf_counter() - started
    print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    model.cli(main)
