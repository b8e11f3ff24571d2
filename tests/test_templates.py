"""Real checkpoints' chat templates and config.json files (tests/fixtures, sources in its README):
our prompt ids equal transformers' apply_chat_template, a trace row trains on exactly its assistant
turn, every config loads with the shapes and RoPE transformers builds from it (or is refused with
its reason), and a folder transformers saved from the GGUF loads and generates.

    python -m pytest tests/test_templates.py -q
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import sft
from eval_aime import user_prompt
from model import Config, Tokenizer, Transformer, load_model, rope_frequencies

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = sorted(p.stem for p in (FIXTURES / "templates").glob("*.jinja"))
OPENS_THINKING = {"deepseek-r1-distill-qwen-7b", "qwq-32b", "nemotron-3-nano"}  # generation prompt ends in "<think>\n"
# what each family's tokenizer_config.json names bos / eos, and the special tokens its template writes
DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
LLAMA3 = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
FAMILY = {"deepseek": (DEEPSEEK[0], DEEPSEEK[1], DEEPSEEK), "llama": (LLAMA3[0], LLAMA3[1], LLAMA3),
          "qwen": (None, "<|im_end|>", []), "smollm2": ("<|im_start|>", "<|im_end|>", [])}


def family(name):
    return next((f for f in FAMILY if name.startswith(f)), "qwen")  # QwQ and Nemotron write ChatML too
SYSTEM = {"role": "system", "content": "You are a careful mathematician."}
USER = {"role": "user", "content": user_prompt("What is $7 \\times 8$?")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer):
    """SmolLM2's tokenizer.json with each template swapped in: the family's special tokens added (and
    <think>, </think> as the reasoning models have them), bos / eos named as its tokenizer_config.json does."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    out = {}
    for name in TEMPLATES:
        bos, eos, specials = FAMILY[family(name)]
        d = tmp_path_factory.mktemp(name)
        tok = HFTokenizer.from_file(str(smollm2_tokenizer / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
        tok.save(str(d / "tokenizer.json"))
        cfg = json.loads((smollm2_tokenizer / "tokenizer_config.json").read_text())
        cfg.update(bos_token=bos, eos_token=eos, chat_template=(FIXTURES / "templates" / f"{name}.jinja").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
        out[name] = d
    return out


def hf_ids(folder, messages, **kw):
    ids = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_every_family_has_a_fixture():
    assert len(TEMPLATES) >= 8 and {name.split("-")[0] for name in TEMPLATES} >= {"deepseek", "llama", "qwen2.5",
                                                                                  "qwen3", "qwq", "smollm2"}


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_ids_equal_apply_chat_template(folders, name, system):
    messages = [SYSTEM, USER] if system else [USER]
    ids, opened = Tokenizer(folders[name]).prompt(messages)
    assert ids == hf_ids(folders[name], messages)
    assert opened == ("<think>\n" if name in OPENS_THINKING else "")


def test_template_keywords_reach_the_template(folders):
    """Qwen3's enable_thinking=False writes an empty thinking block into the generation prompt."""
    tok = Tokenizer(folders["qwen3"])
    ids, opened = tok.prompt([USER], enable_thinking=False)
    assert ids == hf_ids(folders["qwen3"], [USER], enable_thinking=False) != tok.prompt([USER])[0]
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n") and opened == ""


def test_end_of_turn_is_the_templates_not_the_eos_token(folders, tmp_path):
    """Qwen2.5-Math's base checkpoint (the paper's student) names <|endoftext|> its eos, while its
    template closes turns with <|im_end|>: that is the token SFT must teach, and sampling stop on."""
    shutil.copytree(folders["qwen2.5-math-instruct"], tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))
    tok = Tokenizer(tmp_path / "base")
    assert tok.end_of_turn == tok.token_id("<|im_end|>") != tok.token_id("<|endoftext|>")
    assert {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")} <= set(tok.stop_ids)


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_trace_row_trains_on_exactly_thinking_solution_and_end_of_turn(folders, name):
    tok = Tokenizer(folders[name])
    row = {"problem": "What is $7 \\times 8$?", "thinking": "Seven eights: 56. Check: 8*7 = 56.",
           "solution": "The product is $\\boxed{56}$."}
    ids, labels = sft.tokenize(sft.to_messages(row), tok)
    prompt, opened = tok.prompt([USER])
    assert ids[:len(prompt)] == prompt                       # the prompt sampling sends, token for token
    trained = [ids[t + 1] for t in range(len(ids)) if labels[t] != sft.IGNORE]
    assert trained == ids[len(prompt):]                      # everything after it, nothing before
    turn = f"<think>\n{row['thinking']}\n</think>\n\n{row['solution']}"
    end = FAMILY[family(name)][1]
    assert trained[-1] == tok.end_of_turn == tok.token_id(end)
    assert opened + tok.decode(trained[:-1]) == turn          # the thinking is all there ...
    assert tok.decode(ids).count("<think>") == 1              # ... and opened once
    if name.startswith("deepseek"):  # why the turn is not rendered by the template: it drops the thinking
        full = transformers.AutoTokenizer.from_pretrained(folders[name]).apply_chat_template(
            sft.to_messages(row), tokenize=False)
        assert row["thinking"] not in full


@pytest.mark.parametrize("name", ["deepseek-r1-distill-qwen-7b", "qwq-32b", "llama-3.1-instruct"])
def test_multi_turn_rows_train_on_the_last_turn_after_the_templates_context(folders, name):
    messages = [USER, {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n56"},
                {"role": "user", "content": "And $8 \\times 9$?"}, {"role": "assistant", "content": "72"}]
    tok = Tokenizer(folders[name])
    ids, mask = tok.render(messages)
    n = mask.index(1)
    assert ids[:n] == hf_ids(folders[name], messages[:-1])   # earlier turns as the template renders them
    assert tok.decode(ids[n:]) == messages[-1]["content"] + tok.decode([tok.end_of_turn]) and all(mask[n:])


# ----------------------------------------------------------------------------- config.json files

CONFIGS = sorted(p.stem for p in (FIXTURES / "configs").glob("*.json"))
REFUSED = {"mistral-7b-v0.3": "model_type='mistral'", "mixtral-8x7b-v0.1": "model_type='mixtral'",
           "deepseek-v2-lite": "model_type='deepseek_v2'", "gemma2-2b": "model_type='gemma2'"}


@pytest.mark.parametrize("name", CONFIGS)
def test_real_configs_load_or_are_refused_by_name(name, capsys):
    d = json.loads((FIXTURES / "configs" / f"{name}.json").read_text())
    if name in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name]):
            Config.from_dict(d)
        return
    config = Config.from_dict(d, source=name)
    assert capsys.readouterr().err == ""                      # nothing in a real config is unknown to us
    # the model transformers builds from the same file has the same tensors and the same RoPE frequencies
    hf_config = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        hf, ours = transformers.AutoModelForCausalLM.from_config(hf_config), Transformer(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    inv_freq = type(hf.model.rotary_emb)(config=hf_config).inv_freq
    assert torch.allclose(rope_frequencies(config), inv_freq, rtol=1e-6)


# ----------------------------------------------------------------------------- a folder transformers wrote

def test_a_folder_transformers_saved_from_the_gguf_loads_and_generates(tmp_path, smollm2):
    """What a user gets from transformers' GGUF loader and save_pretrained: a config.json with
    _model_name_or_path and unk_token_id, rope_parameters, chat_template.jinja. Greedy tokens equal
    those of our own converted folder (same weights)."""
    from sample import LocalSampler, Request, SamplingParams
    from tools.convert_gguf import default_gguf
    gguf = default_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=transformers.GgufConfig(dequantize=True))
    hf.hf_quantizer = None  # the weights are dense floats now; transformers refuses to save a GGUF-quantized model
    hf.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)
    assert {"_model_name_or_path", "unk_token_id"} <= json.loads((tmp_path / "config.json").read_text()).keys()
    assert (tmp_path / "chat_template.jinja").exists()
    request, params = [Request(messages=[{"role": "user", "content": "What is 2+3?"}])], SamplingParams(16, temperature=0)
    [(_, theirs)] = LocalSampler(tmp_path, "cpu", "float32").generate(request, params)
    [(_, ours)] = LocalSampler(smollm2, "cpu", "float32").generate(request, params)
    assert theirs.token_ids == ours.token_ids and theirs.num_tokens > 0
