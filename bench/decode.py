"""Decoding speed: our sampler vs transformers' generate on the same model, machine and run.

    python bench/decode.py                      # SmolLM2-135M-Instruct, float32 and bfloat16
    python bench/decode.py --model DIR --dtypes bfloat16 --new-tokens 128 --repeats 5
    python bench/decode.py --model /tmp/qwen1.5b --dtypes bfloat16 --samples 64 --compile   # GPU (see random_model.py)

Two workloads, each forced to write exactly --new-tokens tokens (stop tokens ignored): batch 1
greedy, and 16 samples of one prompt at T=0.6. Runs alternate between us and transformers and the
median of --repeats is reported. --compile adds our sampler with `--compile` (static cache; CUDA
graphs on GPU), warmed up at the full length so that compilation is not timed. Also prints the
memory-bandwidth bound of batch 1 (every weight byte read once per token, at the copy bandwidth
measured here) and our fraction of it, and the floor set by the matrix-vector products alone (what
no decoder calling the same kernels can beat).
"""
import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sample import LocalSampler, Request, SamplingParams  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain, step by step, why the sum of two odd numbers is even."}]


def copy_bandwidth(device, nbytes=256 << 20, repeats=5):
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def matvec_seconds(model, device, dtype, spill_bytes=512 << 20, calls=400):
    """Seconds per token spent in the model's matrix-vector products alone (batch 1): each weight
    shape timed on its own, over enough distinct copies that the weights come from memory, not
    cache, then summed over the layers. No decoder that calls the same GEMV kernels beats this."""
    shapes = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = 0.0
    for (n, k), count in shapes.items():
        weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(max(2, spill_bytes // (n * k * 2)))]
        x = torch.randn(1, k, device=device, dtype=dtype)
        for w in weights[:2]:
            F.linear(x, w)
        sync(device)
        t = time.perf_counter()
        for i in range(calls):
            F.linear(x, weights[i % len(weights)])
        sync(device)
        total += count * (time.perf_counter() - t) / calls
    return total


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def ours(sampler, n, new_tokens, temperature):
    reqs = [Request(messages=PROMPT, seed=s) for s in range(n)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_p=1.0)
    sync(sampler.device)
    t = time.perf_counter()
    total = sum(c.num_tokens for _, c in sampler.generate(reqs, params))
    sync(sampler.device)
    return total / (time.perf_counter() - t)


def theirs(hf, ids, n, new_tokens, temperature):
    kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    sync(ids.device)
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=n,
                      pad_token_id=0, **kw)
    sync(ids.device)
    return (out.shape[0] * (out.shape[1] - ids.shape[1])) / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time our sampler with --compile")
    p.add_argument("--workloads", default="batch1,samples", help="which of batch1, samples to run")
    args = p.parse_args()
    import transformers
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'dtype':9} {'workload':32} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6}")
    for dtype in args.dtypes.split(","):
        sampler = LocalSampler(args.model, device=device, dtype=dtype, batch_size=args.samples)
        sampler.stop_ids = set()  # write exactly new_tokens tokens, like min_new_tokens does for transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).to(device).eval()
        ids = torch.tensor([sampler.prompt_ids(Request(messages=PROMPT))], device=device)
        # bytes read per decoded token: every matrix once, the embedding table only one row (ignored)
        weight_bytes = sum(t.numel() * t.element_size() for k, t in sampler.model.named_parameters(remove_duplicate=False)
                           if k != "model.embed_tokens.weight")
        workloads = [w for key, w in (("batch1", ("batch 1 greedy", 1, 0.0)),
                                      ("samples", (f"{args.samples} samples T=0.6", args.samples, 0.6)))
                     if key in args.workloads.split(",")]
        results, hf_results = {}, {}
        for name, n, temp in workloads:
            ours(sampler, n, 16, temp), theirs(hf, ids, n, 16, temp)  # warm up
            a, b = [], []
            for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
                a.append(ours(sampler, n, args.new_tokens, temp))
                b.append(theirs(hf, ids, n, args.new_tokens, temp))
            results[name], hf_results[name] = statistics.median(a), statistics.median(b)
            report(dtype, name, results[name], hf_results[name])
        bound = bw / weight_bytes
        b1 = results.get("batch 1 greedy")
        if b1 and len(results) == 2:
            print(f"{dtype:9} batch-1 bandwidth bound {bound:.1f} tok/s ({weight_bytes / 1e6:.0f} MB of weights per token): "
                  f"ours reaches {b1 / bound:.0%}; {args.samples} samples = {results[workloads[1][0]] / b1:.1f}x our batch 1",
                  flush=True)
        if b1:
            gemv = matvec_seconds(sampler.model, device, sampler.dtype)
            print(f"{dtype:9} batch-1 matrix-vector products alone: {gemv * 1e3:.1f} ms per token, so at most "
                  f"{1 / gemv:.1f} tok/s = {1 / gemv / hf_results['batch 1 greedy']:.2f}x transformers; "
                  f"ours spends {1 / b1 - gemv:+.4f} s per token beyond them", flush=True)
        if args.compile:  # after the eager rows, so that a slow compilation cannot hide them
            del sampler
            compiled = LocalSampler(args.model, device=device, dtype=dtype, batch_size=args.samples, compile=True)
            compiled.stop_ids = set()
            for name, n, temp in workloads:
                ours(compiled, n, args.new_tokens, temp)  # compiles: one graph per batch size and cache length
                c = statistics.median(ours(compiled, n, args.new_tokens, temp) for _ in range(args.repeats))
                report(dtype, name + " --compile", c, hf_results[name])
                if n == 1:
                    print(f"{dtype:9} --compile batch 1 reaches {c / bound:.0%} of the bandwidth bound", flush=True)


def report(dtype, name, ours_tps, hf_tps):
    print(f"{dtype:9} {name:32} {ours_tps:11.1f} {hf_tps:10.1f} {ours_tps / hf_tps:5.2f}x", flush=True)

if __name__ == "__main__":
    main()
