"""Kernel benchmark: check every op against its reference, then time it against PyTorch in the same run.

    python bench/kernels.py           # GPU: checks, then attention / RMSNorm / fused loss vs PyTorch
    python bench/kernels.py --quick   # GPU, a smaller sweep
    TRITON_INTERPRET=1 python bench/kernels.py --tiny   # CPU smoke run of the GPU path, tiny shapes
    python bench/kernels.py --cpu     # (automatic without CUDA) peak memory of the chunked loss vs unfused

GPU attention: causal, bf16, Hq/Hkv = 16/2, D in {128, 64}, T in {2048, 8192, 16384}, one document
(B=1) or four packed ones (cu_seqlens), against SDPA's flash backend (packed: torch's flash
varlen_attn where this torch has it, and one flash call per document), plus SDPA's cuDNN backend on
one document. FLOPs of causal attention: forward 2 * 2 * H * sum(L^2) * D / 2 over documents of length
L, backward 2.5x that. Times are medians (triton.testing.do_bench); memory is the peak allocated during
one forward + backward, beyond the inputs.

CPU: one fresh child process per method measures its peak RSS (ru_maxrss; torch allocations are
invisible to tracemalloc) for forward + backward of the loss at 8192 tokens x 151936 vocab x D=896
(Qwen2.5-0.5B's lm_head) in fp32; the parent checks the two losses and gradients agree.
"""
import argparse
import functools
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import (attention_ref, attention_triton, linear_cross_entropy_ref,  # noqa: E402
                     linear_cross_entropy_triton, rms_norm_ref, rms_norm_triton)


# ----------------------------------------------------------------------------- GPU (or a CPU smoke run)

def fwd_bwd(fn, inputs, dout):
    """Closures for forward only and forward + backward on leaf copies of inputs, and the leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def both():
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if dout is None else dout)
    return forward, both, leaves


def bench(step, leaves):
    """Median ms of step (triton.testing.do_bench on CUDA; on CPU a few timed calls, for smoke runs)."""
    if not leaves[0].is_cuda:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    import triton.testing
    return triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median")  # ms


def peak_mb(step, leaves):
    if not leaves[0].is_cuda:
        return float("nan")
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def host_ms(step, leaves):
    """CPU time to queue one call, without waiting for the GPU: when it nears the measured time, the
    host (Python, launches) is the bottleneck, not the kernels."""
    if not leaves[0].is_cuda:
        return float("nan")
    times = []
    for _ in range(5):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[2]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def out_and_grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if dout is None else dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check(fn, ref, inputs, dout, name, floor=1e-3):
    """The kernel's error vs an fp32 reference, within 2x PyTorch's own bf16 error + floor (DESIGN.md)."""
    ours, eager = out_and_grads(fn, inputs, dout), out_and_grads(ref, inputs, dout)
    fp32 = out_and_grads(ref, [t.float() for t in inputs], dout)
    errs = [(max_err(a, r), max_err(b, r)) for a, b, r in zip(ours, eager, fp32)]
    print(f"{name:<28}" + "  ".join(f"{e:.1e} (torch {t:.1e})" for e, t in errs))
    for e, t in errs:
        assert e <= 2 * t + floor, f"{name}: error {e:.2e} vs torch bf16 {t:.2e}"


def works(fn, inputs):
    """Whether fn runs forward and backward on these inputs (a backend may refuse a shape or a layout)."""
    try:
        fn(*[t.detach().requires_grad_() for t in inputs]).sum().backward()
        return True
    except (RuntimeError, TypeError, ValueError) as e:
        print(f"  ({getattr(fn, '__name__', fn)}: {str(e).splitlines()[0][:100]})")
        return False


def attention_methods(q, k, v, lengths):
    """(name, fn, inputs): ours, then SDPA's flash backend (cuDNN's too for one row). Packed documents
    (lengths) go to torch's flash varlen_attn when this torch has it, else one flash call per document.
    GQA goes through enable_gqa where the backend takes it, else K/V are repeated once outside the timed
    region (marked *). On CPU (smoke runs) SDPA's math backend stands in for flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flash = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    group = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(group, dim=1) for t in (k, v))
    if lengths is None:
        methods = [("triton (ours)", lambda q, k, v: attention_triton(q, k, v), [q, k, v])]
        backends = [("sdpa flash", flash)] + ([("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)] if q.is_cuda else [])
        for name, backend in backends:
            def gqa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def expanded(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if works(gqa, [q, k, v]):
                methods.append((name, gqa, [q, k, v]))
            elif works(expanded, [q, kr, vr]):
                methods.append((name + "*", expanded, [q, kr, vr]))
        return methods
    cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)  # (N + 1,)
    methods = [("triton (ours)", lambda q, k, v: attention_triton(q, k, v, True, cu), [q, k, v])]
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and q.is_cuda:
        params = inspect.signature(varlen_attn).parameters  # causal and GQA arguments vary across versions
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

        def varlen(q, k, v, **gqa):  # (1, H, T, D) views of (T, H, D) memory -> its own (T, H, D) layout
            out = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                              max(lengths), max(lengths), **causal, **gqa)  # (T, H, D)
            return out.transpose(0, 1)[None]  # (1, H, T, D)
        gqa = functools.partial(varlen, enable_gqa=True) if "enable_gqa" in params else varlen
        if works(gqa, [q, k, v]):
            methods.append(("flash varlen", gqa, [q, k, v]))
        elif works(varlen, [q, kr, vr]):
            methods.append(("flash varlen*", varlen, [q, kr, vr]))

    def per_document(q, k, v):
        cuts = [0] + torch.tensor(lengths).cumsum(0).tolist()
        with sdpa_kernel(flash):
            return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
                              for s, e in zip(cuts, cuts[1:])], dim=2)  # (1, H, T, D)
    if works(per_document, [q, kr, vr]):
        methods.append(("flash per doc*", per_document, [q, kr, vr]))
    return methods


def attention_table(args, rand):
    print("\n== attention, causal, bf16, Hq/Hkv = 16/2, B = 1, q/k/v in the model's (B, T, H, D) layout: median "
          "ms, TFLOP/s, ratio = SDPA flash time / this time, host ms = CPU time to queue one fwd+bwd, peak MB of "
          "fwd+bwd over the inputs")
    print(f"{'D':>4} {'T':>6} {'documents':<12} {'method':<15} {'fwd ms':>8} {'TF/s':>6} {'ratio':>6} "
          f"{'f+b ms':>8} {'TF/s':>6} {'ratio':>6} {'host ms':>7} {'peak MB':>8}")
    Hq, Hkv = 16, 2
    for D in args.dims:
        for T in args.lengths:
            # packed: four documents of 40%, 25%, 20% and the rest of T (an SFT batch of unequal chains)
            for lengths in (None, [2 * T // 5, T // 4, T // 5, T - 2 * T // 5 - T // 4 - T // 5]):
                q, k, v, do = (rand(1, T, h, D).transpose(1, 2) for h in (Hq, Hkv, Hkv, Hq))  # (1, H, T, D) views
                squares = T * T if lengths is None else sum(n * n for n in lengths)
                fwd_flops = 2 * 2 * Hq * squares * D / 2  # causal: half of each document's scores
                rows = []
                for name, fn, inputs in attention_methods(q, k, v, lengths):
                    forward, both, leaves = fwd_bwd(fn, inputs, do)
                    rows.append((name, bench(forward, leaves), bench(both, leaves), host_ms(both, leaves),
                                 peak_mb(both, leaves)))
                base = next((r for r in rows if r[0].startswith(("sdpa flash", "flash varlen"))), None) or \
                    next((r for r in rows if r[0].startswith("flash")), rows[0])
                docs = "1" if lengths is None else f"{len(lengths)} packed"
                for name, t_f, t_fb, t_host, mb in rows:
                    print(f"{D:>4} {T:>6} {docs:<12} {name:<15} {t_f:8.2f} {fwd_flops / t_f / 1e9:6.0f} "
                          f"{base[1] / t_f:6.2f} {t_fb:8.2f} {3.5 * fwd_flops / t_fb / 1e9:6.0f} "
                          f"{base[2] / t_fb:6.2f} {t_host:7.2f} {mb:8.0f}", flush=True)


def timings(args):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter mishandles bf16 dots
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (smoke run, interpreter)'}, "
          f"torch {torch.__version__}")
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=dev, generator=g).to(bf16)  # noqa: E731
    T, N, C, V = (1500, 4096, 3584, 151936) if not args.tiny else (100, 64, 64, 1000)

    print("\n== correctness: max abs error vs the fp32 reference [out, grads...] (PyTorch's own bf16 error)")
    q, k, v, do = rand(1, 16, T, 128), rand(1, 2, T, 128), rand(1, 2, T, 128), rand(1, 16, T, 128)
    check(attention_triton, attention_ref, [q, k, v], do, "attention causal GQA")
    cu = torch.tensor([0, 2 * T // 15, 11 * T // 15, T], device=dev, dtype=torch.int32)
    check(lambda q, k, v: attention_triton(q, k, v, True, cu), lambda q, k, v: attention_ref(q, k, v, True, cu),
          [q, k, v], do, "attention packed documents")
    x, w = rand(N, C), 1 + 0.1 * rand(C)
    check(lambda x, w: rms_norm_triton(x, w, 1e-6), lambda x, w: rms_norm_ref(x, w, 1e-6), [x, w], rand(N, C),
          "rms_norm")
    h, wv = rand(N, 896 if not args.tiny else 64), 0.05 * rand(V, 896 if not args.tiny else 64)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    labels[::7] = -100
    unfused = lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels)  # noqa: E731  HF: bf16 logits, fp32 loss
    check(lambda h, w: linear_cross_entropy_triton(h, w, labels), unfused, [h, wv], None, "linear_cross_entropy",
          floor=1e-4)

    attention_table(args, rand)

    print("\n== RMSNorm, bf16, 16384 rows: ms (fwd GB/s counting x read + y written), speedup over eager")
    for D in ([896, 3584] if not args.tiny else [64]):
        x, w, dy = rand(16384 if not args.tiny else 64, D), 1 + 0.1 * rand(D), rand(16384 if not args.tiny else 64, D)
        res = {}
        for name, fn in (("triton", rms_norm_triton), ("eager", rms_norm_ref)):
            forward, both, leaves = fwd_bwd(lambda x, w, fn=fn: fn(x, w, 1e-6), [x, w], dy)
            res[name] = bench(forward, leaves), bench(both, leaves)
        print(f"D={D:<5}" + "".join(f"  {n}: fwd {f:.3f} ms ({4 * x.numel() / f / 1e6:.0f} GB/s), f+b {fb:.3f} ms"
                                     for n, (f, fb) in res.items())
              + f"  speedup fwd {res['eager'][0] / res['triton'][0]:.2f}x, f+b {res['eager'][1] / res['triton'][1]:.2f}x")

    print(f"\n== fused linear + cross-entropy, bf16, D={wv.shape[1]}, V={V}: fwd+bwd ms and peak MB over inputs")
    for N in ([8192, 16384] if not args.tiny else [64]):
        h, labels = rand(N, wv.shape[1]), torch.randint(0, V, (N,), device=dev, generator=g)
        for name, fn in (("triton (ours)", lambda h, w: linear_cross_entropy_triton(h, w, labels)),
                         ("torch chunked", lambda h, w: linear_cross_entropy_ref(h, w, labels)),
                         ("F.linear+F.ce", lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels))):
            _, both, leaves = fwd_bwd(fn, [h, wv], None)
            print(f"N={N:<6} {name:<14} {bench(both, leaves):8.2f} ms {peak_mb(both, leaves):9.0f} MB")


# ----------------------------------------------------------------------------- CPU memory

def cpu_child(method, dtype, out_path):
    """One method in a fresh process: peak RSS of forward + backward, losses and grads saved for the parent."""
    torch.manual_seed(0)
    N, D, V = 8192, 896, 151936
    dtype = getattr(torch, dtype)
    hidden = torch.randn(N, D, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, dtype=dtype).mul_(0.05).requires_grad_()  # in place: no transient copy in the peak
    labels = torch.randint(0, V, (N,))
    labels[::7] = -100
    with open("/proc/self/statm") as f:  # resident pages now: the inputs and torch itself
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # MB
    t = time.time()
    if method == "chunked":
        loss = linear_cross_entropy_ref(hidden, weight, labels)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    loss.backward()
    elapsed = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MB (Linux reports KB)
    torch.save({"loss": loss.detach(), "dh": hidden.grad, "dw": weight.grad}, out_path)
    print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": elapsed}))


def cpu(args):
    print(f"fused loss memory on CPU: 8192 tokens x 151936 vocab x D=896, {args.cpu_dtype}, forward + backward")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("chunked", "unfused"):
            path = os.path.join(tmp, method + ".pt")
            out = subprocess.run([sys.executable, __file__, "--cpu-child", method, "--cpu-dtype", args.cpu_dtype,
                                  "--out", path], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} failed:\n{out.stderr}")
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            results[method]["tensors"] = torch.load(path)
    a, b = results["chunked"]["tensors"], results["unfused"]["tensors"]
    errs = {k: max_err(a[k], b[k]) for k in ("loss", "dh", "dw")}
    print(f"{'method':<34} {'peak RSS MB':>12} {'over inputs MB':>15} {'seconds':>8}")
    for method, label in (("chunked", "linear_cross_entropy (torch path)"), ("unfused", "F.linear + F.cross_entropy")):
        r = results[method]
        print(f"{label:<34} {r['peak_mb']:12.0f} {r['peak_mb'] - r['base_mb']:15.0f} {r['seconds']:8.1f}")
    ratio = results["chunked"]["peak_mb"] / results["unfused"]["peak_mb"]
    extra = (results["chunked"]["peak_mb"] - results["chunked"]["base_mb"]) / \
        (results["unfused"]["peak_mb"] - results["unfused"]["base_mb"])
    print(f"peak ratio chunked / unfused: {ratio:.3f} (1/{1 / ratio:.1f}); over inputs: {extra:.3f} (1/{1 / extra:.1f})")
    print("max abs difference: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for k, x in a.items():
        torch.testing.assert_close(x, b[k], atol=1e-5, rtol=1e-4)
    assert ratio <= 1 / 8, f"peak memory ratio {ratio:.3f} > 1/8"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="attention at D=128 and T in 2048, 8192 only")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64], help="attention head dims")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="attention sequence lengths")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the GPU path (on CPU under "
                   "TRITON_INTERPRET=1)")
    p.add_argument("--cpu", action="store_true", help="CPU memory benchmark of the chunked loss (default without CUDA)")
    p.add_argument("--cpu-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the CPU benchmark")
    p.add_argument("--cpu-child", choices=["chunked", "unfused"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.dims, args.lengths = [128], [2048, 8192]
    if args.tiny:
        args.dims, args.lengths = [64], [40, 130]
    if args.cpu_child:
        cpu_child(args.cpu_child, args.cpu_dtype, args.out)
    elif args.cpu or not (torch.cuda.is_available() or args.tiny):
        cpu(args)
    else:
        timings(args)
