"""Registers, spills and shared memory of the attention kernels on sm_90 (H100, H200), without a GPU.

    python bench/compile_sm90.py             # every autotune config, head dims 64 and 128
    python bench/compile_sm90.py --dims 128

Each config of each kernel in kernels/attention.py is compiled by Triton's own compiler for sm_90a and
assembled by the ptxas Triton ships; `ptxas -v` gives registers per thread (255 is the cap) and bytes
spilled to local memory, Triton's metadata the shared memory. The last column names chained dots
(scores -> P -> P V) whose tile has fewer rows than the warps Triton stacks along them: both
warpgroups then compute the same tile, twice the tensor-core work for that dot.

Arguments are specialized as the model passes them (bf16, q (B, T, H, D) memory viewed as (B, H, T, D),
Hq/Hkv = 16/2, T = 8192, 16-byte aligned), so the code is what a GPU run would compile. dK/dV is
compiled twice: writing bf16 dK, dV (long T: one program sums the whole group) and fp32 partials
(short T: the group split over programs).
Uses Triton internals (triton.runtime.jit); written against triton 3.9.
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
attention = importlib.import_module("kernels.attention")

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)


def duplicated_dots(ttgir):
    """Dots whose (M, N) tile is smaller than the warps x instruction shape of its MMA layout."""
    layouts = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in re.finditer(
        r"^#(mma\d*) = #ttg.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = \[(\d+), (\d+)\], "
        r"instrShape = \[16, (\d+), 16\]", ttgir, re.M)}
    found = set()
    for m in re.finditer(r"warp_group_dot .*-> tensor<(\d+)x(\d+)xf32, #(mma\d*)>", ttgir):
        rows, cols, (warps_m, warps_n, n) = int(m[1]), int(m[2]), layouts[m[3]]
        if warps_m * 16 > rows or warps_n * n > cols:
            found.add(f"{rows}x{cols} on {warps_m}x{warps_n} warps")
    return ", ".join(sorted(found)) or "-"


def compile_one(kernel, args, constexprs, config):
    """Compile kernel (an autotuned JIT function) for sm_90a as the launcher would for these args."""
    fn = kernel.fn
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    kwargs = dict(constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, options)
    start = time.time()
    compiled = compile(ASTSource(fn, signature, constants, attrs), target=TARGET, options=options.__dict__)
    seconds = time.time() - start
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(re.search(r"Used (\d+) registers", log)[1]), "spill": int(spills[1]),
            "smem": compiled.metadata.shared, "mma": "wgmma" if "wgmma" in compiled.asm["ptx"] else "mma.sync",
            "dup": duplicated_dots(compiled.asm["ttgir"]), "seconds": seconds}


def kernel_args(D, T=8192, H=16, Hkv=2, B=1):
    """(name, kernel, positional args, note) of each kernel, laid out as kernels/attention.py launches them."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(B, T, H, D, **meta).transpose(1, 2)  # (B, H, T, D) view, as the model passes it
    k = torch.empty(B, T, Hkv, D, **meta).transpose(1, 2)  # (B, Hkv, T, D) view
    ptr = lambda dtype=torch.bfloat16: torch.empty(64, dtype=dtype)  # noqa: E731  16-byte aligned
    f32, group, scale = torch.float32, H // Hkv, 0.1
    fwd = (ptr(), ptr(), ptr(), ptr(), ptr(f32), None, None, *q.stride()[:3], *k.stride()[:3], *k.stride()[:3],
           *q.stride()[:3], H, group, T, T, scale)
    dq = (ptr(), ptr(), ptr(), ptr(), ptr(), ptr(f32), ptr(f32), ptr(), None, None, *q.stride()[:3],
          *k.stride()[:3], *k.stride()[:3], *q.stride()[:3], *q.stride()[:3], *q.stride()[:3], H, group, T, T,
          scale, scale)
    yield "fwd", attention._attn_fwd, fwd, ""
    yield "dq", attention._attn_bwd_dq, dq, ""
    for split in (1, group):
        if split == 1:  # bf16 dK, dV straight into the gradients
            out, dtype = k.unsqueeze(0), torch.bfloat16  # (1, B, Hkv, T, D)
        else:  # fp32 partials
            out, dtype = torch.empty(split, 2, B, Hkv, T, D, device="meta")[:, 0], f32  # (S, B, Hkv, T, D)
        dkdv = (ptr(), ptr(), ptr(), ptr(), ptr(f32), ptr(f32), ptr(dtype), ptr(dtype), None, None,
                *q.stride()[:3], *k.stride()[:3], *k.stride()[:3], *q.stride()[:3], *out.stride()[:4],
                *out.stride()[:4], H, group, group // split, T, T, scale, scale)
        yield "dkdv", attention._attn_bwd_dkdv, dkdv, "bf16 out" if split == 1 else "fp32 partials"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64], help="head dims to compile")
    args = p.parse_args()
    print(f"{'kernel':<6} {'D':>4} {'note':<16} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill B':>7} {'smem KB':>7} {'mma':<8} {'compile s':>9}  duplicated dots")
    for D in args.dims:
        for name, kernel, kargs, note in kernel_args(D):
            for config in kernel.configs:
                r = compile_one(kernel, kargs, dict(HEAD_DIM=D, CAUSAL=True, VARLEN=False, PREC="tf32"), config)
                print(f"{name:<6} {D:>4} {note:<16} {config.kwargs['BLOCK_M']:>4} {config.kwargs['BLOCK_N']:>4} "
                      f"{config.num_warps:>5} {config.num_stages:>6} {r['regs']:>5} {r['spill']:>7} "
                      f"{r['smem'] / 1024:>7.0f} {r['mma']:<8} {r['seconds']:>9.1f}  {r['dup']}", flush=True)


if __name__ == "__main__":
    main()
