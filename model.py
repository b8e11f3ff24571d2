"""The decoder: Qwen2 / Qwen3 / Llama from a Hugging Face folder, in plain PyTorch, in reading order.

    python model.py checkpoints/smollm2-135m-instruct "The capital of France is"

config.json -> Config -> Transformer (embeddings, blocks of attention + SwiGLU MLP, final norm, lm
head) -> logits or hidden states. Then the KV cache, safetensors load/save in Hugging Face layout
(our output loads in transformers unchanged), the tokenizer with chat rendering (ids + the
assistant-token mask that SFT trains on), and the run manifest every script writes.

What it is not: a framework. One model file, no q/k permutations (HF's rotate-half RoPE), no
pickle, no exec'd configs. Attention, RMSNorm and the loss go through `kernels`, which picks Triton
or the PyTorch reference; this file never imports triton.
"""
import argparse, fcntl, hashlib, json, math, os, shutil, subprocess, sys, time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jinja2.sandbox
import safetensors.torch
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# ----------------------------------------------------------------------------- config

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # model_type: class
# The one list of config.json keys that are refused: each changes the computation in a way this file
# does not implement. (key: (is the value one we cannot honour?, why)). Every other key that is not
# a Config field changes nothing here: token ids, names, dtypes, generation and training settings
# (BOOKKEEPING, silently; pretraining_tp: Llama's sliced matmuls in tensor-parallel pretraining compute
# the same function; quantization_config: load_model looks at the weights themselves), or something we
# do not know (named once on stderr, then loaded).
UNSUPPORTED = {
    "model_type": (lambda v: v not in FAMILIES, f"only {', '.join(FAMILIES)} are implemented"),
    "use_sliding_window": (bool, "sliding-window attention is not implemented"),
    "layer_types": (lambda v: any(t != "full_attention" for t in v), "only full-attention layers are implemented"),
    "hidden_act": (lambda v: v != "silu", "only SiLU (SwiGLU) MLPs are implemented"),
    "mlp_bias": (bool, "MLP biases are not implemented"),
    "attention_dropout": (bool, "attention dropout is not implemented (training would silently differ)"),
    "partial_rotary_factor": (lambda v: v != 1, "RoPE on part of each head is not implemented"),
    "rope_scaling": (lambda v: v.get("rope_type", v.get("type")) not in ("default", "llama3"),
                     "only llama3 RoPE scaling is implemented"),
}
BOOKKEEPING = set("""architectures transformers_version torch_dtype dtype initializer_range use_cache bos_token_id
    eos_token_id pad_token_id unk_token_id sep_token_id max_window_layers sliding_window transformers.js_config
    _name_or_path _model_name_or_path is_llama_config rope_interleaved output_attentions output_hidden_states
    return_dict use_return_dict id2label label2id tokenizer_class keys_to_ignore_at_inference unsloth_fixed
    unsloth_version pretraining_tp quantization_config rope_parameters use_mrope _attn_implementation_autoset
    attn_implementation""".split())
_warned = set()


@dataclass
class Config:
    """The fields are config.json's keys, so a reader can check one against the other."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    head_dim: int | None = None          # Qwen3 sets it; otherwise hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False         # Llama's q/k/v/o bias; Qwen2 always has q/k/v bias

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:  # named here, not at the first forward
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        self.qkv_bias = self.model_type == "qwen2" or self.attention_bias  # not a field: config.json has no such key

    @classmethod
    def from_dict(cls, d, source="config.json"):
        d = {k: v for k, v in d.items() if v is not None}  # a key set to null sets nothing
        if isinstance(d.get("rope_parameters"), dict):  # transformers >= 5: rope_theta and rope_scaling in one dict
            rp = dict(d["rope_parameters"])
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rp)
        if d.get("model_type") == "qwen2":
            d.pop("attention_bias", None)  # transformers' Qwen2 ignores it: q/k/v always have a bias, o never
        refused = [f"{k}={d[k]!r}: {why}" for k, (bad, why) in UNSUPPORTED.items() if k in d and bad(d[k])]
        if refused:
            raise ValueError(f"{source}: not supported: " + "; ".join(refused))
        scaling = d.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) == "default":
            d["rope_scaling"] = None
        known = {f.name for f in fields(cls)}
        unknown = sorted(d.keys() - known - BOOKKEEPING - UNSUPPORTED.keys())
        if unknown and tuple(unknown) not in _warned:
            _warned.add(tuple(unknown))
            print(f"{source}: note: ignoring keys this loader does not know: {', '.join(unknown)}", file=sys.stderr)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (is this a model folder?)") from None
        except (json.JSONDecodeError, TypeError) as e:  # TypeError: a required field is missing
            raise ValueError(f"{path}: invalid config: {e}") from None


# ----------------------------------------------------------------------------- the network

def rope_frequencies(config):
    """Inverse frequencies of rotary embeddings, with Llama 3's long-context rescaling if asked."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (D/2,)
    if s := config.rope_scaling:  # llama3: slow low frequencies by `factor`, keep the high ones, interpolate between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)  # HF's rotate-half layout: the two halves of each head are the pairs
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, H, T, D)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        C, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=config.attention_bias)
        if config.model_type == "qwen3":  # Qwen3 normalizes each head of q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache, cu_seqlens, visible):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)      # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, positions, cache, self.layer_idx, cu_seqlens, visible)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))          # (B, T, C)


def attention(q, k, v, positions, cache, layer_idx, cu_seqlens, visible):
    """The one attention entry point. Without a cache (training, scoring a whole sequence): causal
    attention through kernels (Triton flash attention on CUDA), per document when packed. With a
    cache (decoding): write k, v at each row's positions, then attend to every cached key at or
    before the query's position (`visible`), via SDPA: rows may sit at different positions, so a
    plain causal mask would be wrong."""
    if cache is None:
        return kernels.attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
    k, v = cache.update(layer_idx, positions, k, v)                       # (B, Hkv, L, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, cache, cu_seqlens, visible):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, cu_seqlens, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(  # named like HF's `model.*` submodule: parameter names equal checkpoint keys
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.gradient_checkpointing = False

    def tie_weights(self):
        """The head is the embedding matrix when the config ties them (also after load_state_dict(assign=True),
        which breaks the tie)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids, positions=None, cache=None, cu_seqlens=None, return_hidden=False):
        """ids (B, T) -> logits (B, T, V), or the final hidden states (B, T, C) with return_hidden
        (the SFT loss computes logits in chunks from these). positions (B, T) default to 0..T-1;
        packed rows pass per-document positions with cu_seqlens."""
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(B, T) if positions is None else positions  # (B, T)
        x = self.model.embed_tokens(ids)                                  # (B, T, C)
        # RoPE angles in fp32, as HF computes them (elementwise ops: autocast leaves them in fp32), then
        # cast to the activations' dtype
        freqs = positions[..., None].float() * self.inv_freq.float()       # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                   # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        visible = None  # (B, 1, T, L) when decoding: which cached keys each query sees, those at or before its position
        if cache is not None:
            visible = torch.arange(cache.length or cache.max_len, device=ids.device) <= positions[:, None, :, None]
        checkpoint = self.gradient_checkpointing and self.training
        for block in self.model.layers:
            args = (x, cos, sin, positions, cache, cu_seqlens, visible)
            x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if checkpoint else block(*args)
        x = self.model.norm(x)                                             # (B, T, C)
        return x if return_hidden else self.lm_head(x)                     # (B, T, V)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values, one (B, Hkv, max_len, D) buffer per layer. Static buffers are what
    make torch.compile / CUDA graphs of the decode step possible; one buffer per layer (not one
    stacked tensor) because a compiled in-place write into a slice of a graph input is turned into a
    copy of the whole input. Rows fill from position 0."""
    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.rows = batch_size  # rows in use: the sampler shrinks the batch as completions finish
        self.length = None      # if set, attend only to the first `length` slots (the sampler's bound)

    def update(self, layer, positions, k, v):
        """Write k, v (B, Hkv, T, D) at positions (B, T); return the visible slice (B, Hkv, L, D)."""
        keys, values = self.k[layer], self.v[layer]
        if self.rows != self.batch_size:
            keys, values = keys[:self.rows], values[:self.rows]
        index = positions[:, None, :, None].expand_as(k)               # (B, Hkv, T, D)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        L = self.length or self.max_len
        return keys[:, :, :L], values[:, :, :L]

    def write(self, rows, other):
        """Copy all of another cache's row 0 (a prefill) into `rows`."""
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            mine[rows, :, :other.max_len] = theirs[:1]

    def copy_rows(self, src_row, dst_rows, length):
        """Copy one row's first `length` positions to other rows (prefill once, sample n times)."""
        for buf in self.k + self.v:
            buf[dst_rows, :, :length] = buf[src_row:src_row + 1, :, :length]


# ----------------------------------------------------------------------------- load / save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device")
    return device


def pick_dtype(dtype, device):
    if dtype == "auto":  # bf16 on GPUs that have it; fp32 on CPU, where bf16 matmuls are slow and inexact
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[dtype] if isinstance(dtype, str) else dtype  # a name (the scripts' --dtype choices) or a dtype


def read_json(path, default=None):
    """A JSON file's value, or `default` where there is no such file."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else default


def safetensors_files(folder):
    """The checkpoint's files: one model.safetensors, or the shards named in the index."""
    if index := read_json(folder / "model.safetensors.index.json"):
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{folder}: only pickle weights (*.bin/*.pt); we load safetensors only")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_safetensors(path, dtype, device, quantization=None, chunk_bytes=64 << 20):
    """Yield (name, tensor) from one file, converted to dtype/device. When nothing needs converting
    the tensor is a view into a private memory map of the file: no copy at all. Otherwise it is
    streamed through a small buffer, so peak memory is the converted weights plus one chunk (a
    whole-file map would keep every source page resident). The header is checked against the file
    size, so a truncated or corrupt file fails here with its name instead of later with garbage."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:  # (a file shorter than 8 bytes fails here too)
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        # the tensors that need no conversion are views into one private (copy-on-write) map of the file
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if str(device) == "cpu" else None
        for name, info in header.items():
            src = ST_DTYPES.get(info["dtype"])
            if src is None:  # a decoder's weights are floats: anything else is packed quantized blocks
                raise ValueError(f"{path}: tensor {name!r} is {info['dtype']}: quantized weights "
                                 f"({quantization or 'no quantization_config'}) are not supported; "
                                 "use the bf16/fp16/fp32 checkpoint")
            begin, end = (8 + n + o for o in info["data_offsets"])
            if end > size or end - begin != math.prod(info["shape"]) * src.itemsize:
                raise ValueError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
            if src == dtype and str(device) == "cpu" and begin % src.itemsize == 0:
                yield name, torch.empty(0, dtype=src).set_(storage, begin // src.itemsize, info["shape"])
                continue
            out = torch.empty(info["shape"], dtype=dtype, device=device)
            flat, step = out.view(-1), max(1, chunk_bytes // src.itemsize)
            f.seek(begin)
            for i in range(0, flat.numel(), step):
                buf = bytearray(f.read(min(step, flat.numel() - i) * src.itemsize))
                flat[i:i + len(buf) // src.itemsize] = torch.frombuffer(buf, dtype=src)
            yield name, out


def load_model(folder, device="cpu", dtype=torch.float32):
    """Build on the meta device, then assign the tensors read from safetensors (memory-mapped
    when no dtype or device conversion is needed): no second full copy of the weights, ever."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    config = Config.from_json(folder / "config.json")
    quant = read_json(folder / "config.json").get("quantization_config")
    quant = quant and quant.get("quant_method", "quantization_config")
    device = pick_device(device)  # a torch.device passes through
    dtype = pick_dtype(dtype, str(device))  # from the resolved device: "auto" is bf16 on a bf16 GPU
    with torch.device("meta"):
        model = Transformer(config)
    tied = config.tie_word_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    state, problems = {}, []
    for path in safetensors_files(folder):
        for name, t in read_safetensors(path, dtype, device, quant):
            if tied and name == "lm_head.weight":
                continue  # some tied checkpoints also store the head; the embedding is the one we use
            if name not in expected:
                problems.append(f"unexpected tensor {name!r} in {path.name}")
            elif tuple(t.shape) != expected[name]:
                problems.append(f"tensor {name!r} in {path.name} has shape {tuple(t.shape)}, expected {expected[name]}")
            state[name] = t
    problems += [f"missing tensor {k!r}" for k in expected if k not in state]
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match config.json: " + "; ".join(problems[:5])
                         + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    if quant:  # e.g. a bitsandbytes or GGUF model saved after dequantizing: the floats are the model
        print(f"{folder}/config.json: note: quantization_config ({quant}) over floating-point weights: "
              "loading them as they are", file=sys.stderr)
    model.load_state_dict(state, strict=not tied, assign=True)
    model.tie_weights()
    model.inv_freq = rope_frequencies(config).to(device)
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def save_model(model, folder, tokenizer_from=None, extra_files=None, max_shard_bytes=5 * 1024**3):
    """Write an HF-layout folder atomically: everything goes to a temporary sibling, which then
    replaces `folder`. A crash mid-save leaves the previous folder (or nothing), never half a folder.
    Weights over max_shard_bytes are split into shards named in model.safetensors.index.json."""
    folder, config = Path(folder), model.config
    stamp = f"{os.getpid()}-{time.time_ns()}"
    tmp, old = folder.with_name(f".{folder.name}.tmp-{stamp}"), folder.with_name(f".{folder.name}.old-{stamp}")
    tmp.mkdir(parents=True)
    try:
        write_json_atomic(tmp / "config.json", {**asdict(config), "architectures": [FAMILIES[config.model_type]],
                          "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")})
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        shards = [{}]  # in state order, a new shard whenever the next tensor would overflow this one
        for k, v in state.items():
            if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + v.nbytes > max_shard_bytes:
                shards.append({})
            shards[-1][k] = v
        n = len(shards)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else ["model.safetensors"]
        for name, shard in zip(names, shards):
            safetensors.torch.save_file(shard, tmp / name, metadata={"format": "pt"})
        if n > 1:
            write_json_atomic(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(v.nbytes for v in state.values())},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}})
        for name in TOKENIZER_FILES if tokenizer_from is not None else ():
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, tmp / name)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2) + "\n")
        # POSIX renames a folder atomically only onto a missing or empty target, so the old folder
        # steps aside first and is deleted once the new one is in place
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- tokenizer + chat

def raise_exception(message):  # what a template calls to refuse a conversation
    raise jinja2.TemplateError(message)


# jinja2 as transformers' apply_chat_template sets it up: an immutable sandbox (templates come from the
# Hub), trimmed blocks, loop controls, and the helpers templates call
CHAT = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
CHAT.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
CHAT.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)


class Tokenizer:
    """tokenizers' BPE on tokenizer.json, and chat rendering with the checkpoint's own chat template
    (chat_template.jinja, else tokenizer_config.json's chat_template) evaluated as transformers and
    vLLM do: jinja2's immutable sandbox with bos_token, eos_token, add_generation_prompt and
    raise_exception. Stop tokens come from the folder's files and the template's end of turn."""

    def __init__(self, folder):
        self.folder = folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (the tokenizer is needed to encode prompts)")
        self.tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = read_json(folder / "tokenizer_config.json", {})
        jinja = folder / "chat_template.jinja"  # the file wins over tokenizer_config.json's key
        template = jinja.read_text() if jinja.exists() else cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        try:
            self.template = CHAT.from_string(template) if template else None
        except jinja2.TemplateError as e:
            raise ValueError(f"{folder}: the chat template does not compile: {e}") from None
        token = lambda v: v.get("content") if isinstance(v, dict) else v
        # what transformers passes the template besides the messages: its named special tokens
        self.special = {k: token(cfg[k]) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                                    "cls_token", "mask_token") if token(cfg.get(k))}
        # end of turn: the token the template closes an assistant turn with (<|im_end|>, <|eot_id|>,
        # <｜end▁of▁sentence｜>), read off a rendering; else the eos token
        eos = self.tok.token_to_id(self.special.get("eos_token", ""))
        try:
            text = self.chat_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "PROBE"}], False)
            after = self.encode(text[text.rindex("PROBE") + len("PROBE"):])
        except ValueError:  # no template, or one that refuses this conversation
            after = []
        self.end_of_turn = after[0] if after and after[0] in self.tok.get_added_tokens_decoder() else eos
        stop = {self.end_of_turn, eos}
        for name in ("generation_config.json", "config.json"):
            eos = read_json(folder / name, {}).get("eos_token_id")
            stop.update(eos if isinstance(eos, list) else [eos])
        self.stop_ids = sorted(stop - {None})

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text):
        """The id of a single token (e.g. '</think>'), or None if the text is not one token."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def chat_text(self, messages, add_generation_prompt, **template_kwargs):
        """The template's text, as transformers' apply_chat_template(..., tokenize=False) renders it."""
        if self.template is None:
            raise ValueError(f"{self.folder}: no chat template (none in tokenizer_config.json or chat_template.jinja): "
                             "send the text as it is with --raw-prompt (sample.py: leave out --chat)")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role system/user/assistant and string content, got {m!r:.200}")
        try:
            return self.template.render(messages=messages, tools=None, documents=None, **self.special,
                                        add_generation_prompt=add_generation_prompt, **template_kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.folder}: chat template: {e}") from None

    def prompt(self, messages, **template_kwargs):
        """-> (ids the model continues, the start of the reply the generation prompt already wrote:
        "<think>\\n" when the template opens thinking (R1-Distill, QwQ), else "")."""
        text = self.chat_text(messages, True, **template_kwargs)
        head = self.chat_text(messages, False, **template_kwargs)
        generation = text[len(head):] if text.startswith(head) else ""
        i = generation.rfind("<think>")
        return self.encode(text), generation[i:] if i >= 0 and "</think>" not in generation[i:] else ""

    def render(self, messages, **template_kwargs):
        """A conversation ending in an assistant turn -> (ids, mask) for SFT. The ids are the prompt of
        the turns before it (exactly what sampling sends), then that turn's content as written, less
        what the prompt already opened, then the end-of-turn token; mask is 1 on those last tokens.
        Earlier assistant turns are context, rendered (and maybe rewritten) by the template, unmasked."""
        *context, last = messages
        if not context or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ValueError("a training conversation needs turns before a last assistant turn")
        ids, opened = self.prompt(context, **template_kwargs)
        if self.end_of_turn is None:
            raise ValueError(f"{self.folder}: no end-of-turn token (none in the template, no eos_token) to train on")
        target = self.encode(last["content"].removeprefix(opened)) + [self.end_of_turn]
        return ids + target, [0] * len(ids) + [1] * len(target)


def json_object(text):
    """The argparse type of --chat-template-kwargs: a JSON object."""
    try:
        if isinstance(value := json.loads(text), dict):
            return value
    except json.JSONDecodeError:
        pass
    raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"enable_thinking\": false}}', got {text!r}")


# ----------------------------------------------------------------------------- the loop's conversation
# Defined once, here: the user turn eval_aime.py scores with, distill.py sends the teacher and sft.py
# trains on; a trace's assistant turn; the cue budget forcing (sample.py) writes after "</think>".

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
ANSWER_CUE = "Final Answer: "  # s1's


def user_prompt(problem):
    return f"{problem}\n\n{PROMPT_SUFFIX}"


def trace_turn(thinking, solution):
    """A distilled trace as the assistant turn sft.py trains on. A plain teacher's answer (distill.py
    --plain-ok) has no thinking: the solution is the whole chain."""
    thinking = thinking.strip()
    return (f"<think>\n{thinking}\n</think>\n\n" if thinking else "") + solution.strip()


# ----------------------------------------------------------------------------- run manifest

def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json_atomic(path, obj):
    """Write JSON to a temporary file in the same (existing) folder, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_manifest(args, inputs=(), model_dir=None):
    """What produced an output: command, code version, inputs by sha256, the model folder's own
    manifest (so a score points to a checkpoint, which points to its traces, which point to their
    teacher), settings, versions, device. Scripts add wall time and token counts when they finish."""
    repo = Path(__file__).resolve().parent
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    files = []
    for p in map(Path, inputs):
        with open(p, "rb") as f:
            rows = sum(1 for line in f if line.strip())
        files.append({"path": str(p.resolve()), "sha256": sha256_file(p), "rows": rows})
        if (own := read_json(f"{p}.run.json")) is not None:  # e.g. traces.jsonl.run.json (distill.py's): the teacher
            files[-1]["manifest"] = own
    m = Path(model_dir) if model_dir is not None and Path(model_dir).is_dir() else None
    return {
        "command": [sys.executable, *sys.argv],
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "inputs": files,
        "model": {"path": str(m.resolve()),
                  "config_sha256": sha256_file(m / "config.json") if (m / "config.json").exists() else None,
                  "manifest": read_json(m / "run.json")} if m else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(args).items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- the scripts' conventions
# Every script: an expected error (bad input, flag, missing file or device, refused resume) is one line
# on stderr and exit 2; Ctrl-C is exit 130; neither shows a traceback; anything else keeps its own.
# An output has one writer at a time, and a script only ever repairs, truncates or deletes files it
# recognises as its own.

class UserError(SystemExit):
    """An expected error, said in one line. A SystemExit, so that code calling a script's main()
    directly (tests, loop.py) stops the same way; cli() prints it and exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f"{message} (see --help)")


def number(lo, hi=None, kind=int, above=False):
    """An argparse type: a finite `kind` >= lo (> lo with `above`) and <= hi; the error states the range."""
    rule = f"in {'(' if above else '['}{lo}, {hi}]" if hi is not None else f"{'>' if above else '>='} {lo}"
    def parse(text):
        try:
            x = kind(text)
            if math.isfinite(x) and (x > lo if above else x >= lo) and (hi is None or x <= hi):
                return x
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {rule}, got {text!r}")
    return parse


def cli(main):
    """Run a script's main() under the convention above; returns what main returns."""
    name = Path(sys.argv[0]).name
    try:
        return main()
    except UserError as e:
        message = e.code
    except OSError as e:  # a file that is missing, unreadable or unwritable; a full disk
        message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def user_errors(path=None):
    """ValueError and OSError raised inside become one UserError line naming `path`: for code that
    reads the user's inputs (a model folder, a data file), where they are the input's fault."""
    try:
        yield
    except (OSError, ValueError) as e:
        message = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else
                   f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e))
        raise UserError(message if path is None or str(path) in message else f"{path}: {message}") from None


@contextmanager
def output_lock(path, folder=False):
    """Hold an exclusive lock on an output for the length of a run: a second writer is refused at once.
    A folder is locked itself (made if missing); a file through `<path>.lock`, which stays (deleting a
    lock file races with the next writer). An output that cannot be written is refused before any work."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"--out {path} is a folder: give a file name")
    (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(f"--out {path}: not writable")
    target = path if folder else Path(f"{path}.lock")
    fd = os.open(target, os.O_RDONLY if folder else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {path} is being written by another run (it holds the lock on {target}): "
                            "wait for it to finish, or use another --out") from None
        yield
    finally:
        os.close(fd)


def remove_leftovers(folder, *patterns):
    """Delete what a killed run left in `folder`: temporary files and folders matching `patterns`,
    names only our own writers use. Called while holding the output's lock, so nobody is writing them."""
    for pattern in patterns:
        for p in Path(folder).glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def read_records(path, repair=False):
    """The complete lines of a JSONL records file ([] if none). The text after the last newline is a line
    torn by a kill: cut off when repair is set (by the file's own writer), otherwise ignored (another
    writer may be at it). A bad complete line is a ValueError naming the file and line."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        os.truncate(path, end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: corrupt record in the middle of the file") from None
    return rows


def append_record(path, obj):
    """Append one JSON line, durably: one write call, then fsync before the caller goes on. A killed
    process's writes survive in the page cache; fsync also covers a lost machine, for a few ms per record
    (a sample, an answer, a step) that took far longer to make. Made on first use: no empty files."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    with open(path, "ab", buffering=0) as f:
        while data:
            data = data[f.write(data):]
        os.fsync(f.fileno())


def refuse_changes(old, new, message):
    """A resume with another configuration is refused: message, with {} for 'key: old -> new; ...' over
    the keys whose values differ."""
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
    if diff:
        raise UserError(message.format("; ".join(diff)))


def folder_fingerprint(folder):
    """A cheap fingerprint of a model folder's content, which a retrain, a rewrite in place or a plain
    copy (new modification times) changes: the small files (config, tokenizer, chat template) by
    content; each safetensors file by size, modification time and header (names, dtypes, shapes,
    offsets). None for no folder."""
    if not folder or not Path(folder).is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                header = f.read(min(int.from_bytes(f.read(8), "little"), 100 << 20))
            h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}:".encode() + header)
        elif p.name in ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


if __name__ == "__main__":  # a smoke test: greedy continuation of a prompt, no cache
    folder, prompt = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"
    model, tok = load_model(folder).eval(), Tokenizer(folder)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    print(tok.decode(ids[0].tolist()))
