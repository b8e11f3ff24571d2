"""The three ops the model calls, each routed to a Triton kernel or to its PyTorch reference.

    attention(q, k, v, causal=True, cu_seqlens=None)     kernels/attention.py
    rms_norm(x, weight, eps)                              kernels/rmsnorm.py
    linear_cross_entropy(hidden, weight, labels, ...)     kernels/cross_entropy.py

The route is decided once, at import, by the environment variable KERNELS:
    auto (default)  CUDA tensors go to Triton when triton imports; everything else to the reference
    triton          Triton for every tensor (CPU tensors only work under TRITON_INTERPRET=1, as in the tests)
    torch           always the reference
`import kernels` works without triton installed (e.g. macOS); the references then serve every call.
To pick a path per call (tests, benchmarks), use the *_ref / *_triton functions re-exported here.
"""
import os

from .attention import attention_ref, attention_triton
from .cross_entropy import linear_cross_entropy_ref, linear_cross_entropy_triton
from .rmsnorm import rms_norm_ref, rms_norm_triton

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

MODE = os.environ.get("KERNELS", "auto")
if MODE not in ("auto", "triton", "torch"):
    raise ValueError(f"KERNELS must be auto, triton or torch, got {MODE!r}")
if MODE == "triton" and not HAVE_TRITON:
    raise ImportError("KERNELS=triton but triton is not installed")


def _use_triton(t):
    return MODE == "triton" or (MODE == "auto" and HAVE_TRITON and t.is_cuda)


def attention(q, k, v, causal=True, cu_seqlens=None):
    """q (B, Hq, T, D), k and v (B, Hkv, Tk, D) -> (B, Hq, T, D); cu_seqlens (N+1,) int32 packs documents (B == 1)."""
    fn = attention_triton if _use_triton(q) else attention_ref
    return fn(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


def rms_norm(x, weight, eps):
    """x (..., D), weight (D,) -> (..., D), Hugging Face's RMSNorm numerics."""
    return (rms_norm_triton if _use_triton(x) else rms_norm_ref)(x, weight, eps)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """hidden (N, D), weight (V, D), labels (N,) int64 -> scalar fp32 loss of hidden @ weight.T, chunked."""
    fn = linear_cross_entropy_triton if _use_triton(hidden) else linear_cross_entropy_ref
    return fn(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)


__all__ = ["attention", "rms_norm", "linear_cross_entropy", "attention_ref", "attention_triton", "rms_norm_ref",
           "rms_norm_triton", "linear_cross_entropy_ref", "linear_cross_entropy_triton", "MODE", "HAVE_TRITON"]
