"""One training step of sft.py against transformers, same model, batch, sequence length and optimizer.

    python bench/sft.py                                  # T = 1024 and 4096, float32 and bfloat16
    python bench/sft.py --quick                          # 1 warmup + 2 timed steps each, 1 round
    python bench/sft.py --grad-checkpointing             # both sides recompute activations
    python bench/sft.py --model DIR --impls ours --lengths 16384 32768 --dtypes bfloat16 --grad-checkpointing --longest
                                                         # long rows, ours only, and the longest that fits

A step is: forward with the loss on every next token of one row of T tokens (B = 1), backward,
gradient clipping to 1.0, AdamW (the optimizer sft.py builds, for both). Ours is sft.LossModel (hidden
states -> chunked linear cross-entropy, never T x V logits) through sft.train_step; transformers' is
AutoModelForCausalLM from the same folder with its normal `labels=` loss and SDPA attention. Weights
are fp32 on both sides; bfloat16 means autocast, as the HF Trainer does it.

How it measures, on a machine that may be shared and noisy:
- speed: one child process holds both models and alternates their steps (ours, theirs, theirs, ours,
  ...), so a change in machine load hits both alike; tokens/s is the median of the timed steps, over
  every round (a fresh child each round);
- peak memory: a fresh child process per implementation and configuration runs two steps (from the
  second on, activations coexist with the optimizer state: the steady-state peak) and reports
  ru_maxrss on CPU (the whole process: weights, optimizer, libraries) or torch.cuda.max_memory_allocated
  on GPU;
- --longest: with activation checkpointing and a chunked loss, peak memory grows linearly in T (flash
  attention keeps no T x T matrix), so a line through the first and last rows' peaks, solved for the
  device's memory, predicts the longest row one step can train on (not run: a step there is long).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_step(impl, args, device, dtype, ids):
    """A closure that runs one training step of `impl` and returns its loss."""
    import torch
    import sft
    from model import load_model
    settings = SimpleNamespace(lr=1e-5, weight_decay=0.0)
    if impl == "ours":
        model = load_model(args.model, device=device, dtype=torch.float32)
        model.gradient_checkpointing = args.grad_checkpointing
        lm = sft.LossModel(model, dtype, args.chunk_size).train()
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], sft.IGNORE)], dim=1)  # (1, T)
        batch = {"ids": ids, "labels": labels, "positions": torch.arange(ids.shape[1], device=device)[None]}
        optimizer = sft.build_optimizer(lm, settings, device)
        one = sft.Dist(0, 1, device)
        return lambda: sft.train_step(lm, optimizer, [batch], ids.shape[1] - 1, one, 1.0)[0]
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).train()
    if args.grad_checkpointing:
        hf.gradient_checkpointing_enable()
    optimizer = sft.build_optimizer(hf, settings, device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = hf(input_ids=ids, labels=ids).loss  # shifts inside: T - 1 targets, as ours
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def child(args):
    """--child speed: both implementations, steps alternating; --child ours|hf: two steps, peak memory."""
    import torch
    from model import pick_device
    device = torch.device(pick_device(args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, args.seq), device=device)  # (1, T)
    impls = args.impls if args.child == "speed" else [args.child]
    steps = {impl: make_step(impl, args, device, dtype, ids) for impl in impls}
    times, losses = {impl: [] for impl in impls}, {}
    for i in range(args.warmup + args.steps if args.child == "speed" else 2):
        for impl in (impls if i % 2 == 0 else impls[::-1]):
            t0 = time.perf_counter()
            loss = steps[impl]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[impl].append(time.perf_counter() - t0)
            losses.setdefault(impl, loss)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    print(json.dumps({"times": {k: v[args.warmup:] for k, v in times.items()}, "peak_gb": peak / 1e9,
                      "total_gb": total / 1e9,
                      "first_loss": losses, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}))


def run_child(impl, seq, dtype, args):
    cmd = [sys.executable, __file__, "--child", impl, "--seq", str(seq), "--dtype", dtype, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--impls", *args.impls]
    cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
    cmd += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} T={seq} {dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(REPO / "checkpoints" / "smollm2-135m-instruct"))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="sequence lengths T")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="speed children (each timing both implementations) per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per child")
    p.add_argument("--quick", action="store_true", help="1 round, 1 warmup + 2 timed steps")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of our loss (default: the kernel's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU (H100/H200 SXM: 989)")
    p.add_argument("--impls", nargs="+", default=["ours", "hf"], choices=["ours", "hf"], help="what to run")
    p.add_argument("--longest", action="store_true", help="predict the longest row that fits (see above)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--child", choices=["speed", "ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    results = []
    for seq in args.lengths:
        for dtype in args.dtypes:
            row = {"T": seq, "dtype": dtype}
            for impl in args.impls:
                r = run_child(impl, seq, dtype, args)
                row[f"{impl}_peak_gb"], row["device"], row["total_gb"] = r["peak_gb"], r["device"], r["total_gb"]
            times = {impl: [] for impl in args.impls}
            for _ in range(args.rounds):
                r = run_child("speed", seq, dtype, args)
                for impl in times:
                    times[impl] += r["times"][impl]
                    row[f"{impl}_first_loss"] = r["first_loss"][impl]
            for impl in times:
                row[f"{impl}_tok_s"] = seq / statistics.median(times[impl])
                row[f"{impl}_step_s"] = [round(t, 3) for t in times[impl]]
            print(f"  T={seq} {dtype}: " + ", ".join(f"{i} {row[f'{i}_tok_s']:,.0f} tok/s {row[f'{i}_peak_gb']:.2f} GB"
                                                    for i in args.impls), file=sys.stderr, flush=True)
            results.append(row)
    print(f"\nsft.py vs transformers, one training step (B=1, AdamW, clip 1.0), {results[0]['device']}, "
          f"{args.rounds} round(s) x {args.steps} timed steps each, grad checkpointing {'on' if args.grad_checkpointing else 'off'}")
    print(f"{'T':>6} {'dtype':>9} | {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} | {'ours GB':>8} {'hf GB':>7} "
          f"{'ratio':>6} | {'loss ours':>9} {'loss hf':>8}")
    if results[0]["device"] != "cpu":  # model FLOPs utilization, counted as sft.py counts it
        import sft
        from model import Config
        config = Config.from_json(Path(args.model) / "config.json")
        for r in results:
            flops = sft.step_flops(config, [r["T"]]) / r["T"]  # per token
            for i in args.impls:
                r[f"{i}_mfu"] = r[f"{i}_tok_s"] * flops / (args.peak_tflops * 1e12)
            print(f"  T={r['T']} {r['dtype']}: MFU " + ", ".join(f"{i} {r[f'{i}_mfu']:.1%}" for i in args.impls)
                  + f" (of {args.peak_tflops:.0f} TFLOP/s)")
    both = args.impls == ["ours", "hf"]
    for r in results:
        ratio = lambda key: f"{r[f'ours_{key}'] / r[f'hf_{key}']:>5.2f}x" if both else f"{'-':>6}"  # noqa: E731
        cell = lambda key, width, fmt: format(r[key], fmt).rjust(width) if key in r else "-".rjust(width)  # noqa: E731
        print(f"{r['T']:>6} {r['dtype']:>9} | {cell('ours_tok_s', 10, ',.0f')} {cell('hf_tok_s', 9, ',.0f')} "
              f"{ratio('tok_s')} | {cell('ours_peak_gb', 8, '.2f')} {cell('hf_peak_gb', 7, '.2f')} "
              f"{ratio('peak_gb')} | {cell('ours_first_loss', 9, '.4f')} {cell('hf_first_loss', 8, '.4f')}")
    if args.longest and "ours" in args.impls:
        longest(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def longest(results):
    """The longest row one step fits in, from a line through (T, peak) of the first and last rows."""
    (t1, p1), (t2, p2) = [(r["T"], r["ours_peak_gb"]) for r in (results[0], results[-1])]
    if t2 <= t1 or p2 <= p1:
        return print("--longest needs two lengths, the peak growing with T")
    per_token = (p2 - p1) / (t2 - t1)  # GB per token
    total = results[-1]["total_gb"] or float("nan")
    print(f"peak memory ~ {p1 - per_token * t1:.1f} GB + {per_token * 1e6:.1f} KB per token: the longest row "
          f"that fits {total:.0f} GB is ~{int((total - p1) / per_token + t1):,} tokens (predicted, not run)")


if __name__ == "__main__":
    main()
