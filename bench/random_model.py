"""A random-weight model folder of a real model's shape, for speed benchmarks where the real weights
are not at hand (a lent GPU machine has no network). Speed does not depend on the weights' values.

    python bench/random_model.py --shape qwen2.5-1.5b --tokenizer-from checkpoints/smollm2-135m-instruct --out /tmp/qwen1.5b

The tokenizer is borrowed from --tokenizer-from: token ids it does not know decode to nothing.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Config, Transformer, save_model  # noqa: E402

# config.json fields of the published checkpoints (Qwen/Qwen2.5-*, deepseek-ai/DeepSeek-R1-Distill-Qwen-*)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
}


def random_model(shape, device="cpu", dtype=torch.bfloat16, seed=0):
    config = Config(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    p.add_argument("--tokenizer-from", required=True, help="a model folder whose tokenizer files are copied")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = random_model(args.shape, args.device, getattr(torch, args.dtype))
    save_model(model, args.out, tokenizer_from=args.tokenizer_from)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: random {args.shape} ({n / 1e9:.2f}B parameters, {args.dtype})")


if __name__ == "__main__":
    main()
