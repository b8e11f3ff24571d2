"""RMSNorm, forward and backward (input and weight gradients) fused in Triton, with Hugging Face numerics.

Forward, per row x of length D (as LlamaRMSNorm / Qwen2RMSNorm):
    r = 1 / sqrt(mean(x^2) + eps)    in fp32, saved for the backward (one float per row)
    h = x r                          in fp32, then cast back to x's dtype BEFORE the weight multiply
    y = w * h.to(x.dtype)            (y's dtype follows torch promotion of w and x, as in eager)
Backward, with g = dy * w:
    dx = r (g - h mean(g h))         (d/dx of x r, r depending on every x)
    dw = sum over rows of dy * h.to(x.dtype)
The weight gradient is summed per program over a run of rows into an fp32 partial, then the partials
are summed in torch: no atomics, and the same result every run.

`rms_norm_ref` is the CPU path and the test oracle.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the module still imports, only rms_norm_ref can run
    from ._no_triton import triton, tl


def rms_norm_ref(x, weight, eps):
    h = x.float()  # (..., D)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., D)
    return weight * h.to(x.dtype)  # (..., D) the cast comes before the weight, as in Hugging Face


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(X + row * stride_x + cols, mask=cols < D, other=0.0)  # (BD,)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf) / D + eps)
    h = (xf * rstd).to(x.dtype)  # HF rounds to the input dtype before the weight
    w = tl.load(W + cols, mask=cols < D, other=0.0)
    # eager multiplies two bf16/fp16 tensors in fp32 and rounds once; the product is exact in fp32 here too
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cols < D)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, D, ROWS_PER_PROGRAM,
                  BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # (BD,)
    dw = tl.zeros([BLOCK_D], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = first + i
        if row < N:
            row64 = row.to(tl.int64)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)  # (BD,)
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0)  # (BD,)
            rstd = tl.load(RSTD + row64)
            h = x.to(tl.float32) * rstd
            dw += dy * h.to(x.dtype).to(tl.float32)  # the weight saw h rounded to x's dtype
            g = dy * w
            dx = rstd * (g - h * (tl.sum(g * h) / D))
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _launch_cfg(D):
    block = triton.next_power_of_2(D)
    return block, min(max(block // 256, 1), 16)  # BLOCK_D, num_warps: ~256 elements per warp


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        x2 = x.reshape(-1, D)  # (N, D) a view when x is contiguous
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N = x2.shape[0]
        y = torch.empty(N, D, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)  # (N, D)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
        block, warps = _launch_cfg(D)
        _rms_norm_fwd[(N,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps, BLOCK_D=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy = dy.reshape(N, D)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty_like(x2)  # (N, D)
        # a few programs per SM, each owning a run of rows and one fp32 partial of dw
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2
        programs = min(N, 4 * sms)
        rows_per_program = triton.cdiv(N, programs)
        dw_partial = torch.empty(programs, D, dtype=torch.float32, device=x2.device)  # (P, D)
        block, warps = _launch_cfg(D)
        _rms_norm_bwd[(programs,)](dy, x2, weight, rstd, dx, dw_partial, dy.stride(0), x2.stride(0), dx.stride(0),
                                   N, D, rows_per_program, BLOCK_D=block, num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype)  # (D,)
        return dx.view(ctx.x_shape), dw, None


def rms_norm_triton(x, weight, eps):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if x.device != weight.device:
        raise ValueError(f"x on {x.device}, weight on {weight.device}")
    return _RMSNorm.apply(x, weight, eps)
