"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` against labels, never holding N x V logits.

For a row with logits z = W h (V of them) and label y:
    loss = logsumexp(z) - z_y
    dloss/dz = softmax(z) - onehot(y)        dh = W^T dz,   dW = dz h^T   (summed over rows)
The forward walks over chunks of rows. Per chunk it forms the chunk's logits, takes the loss, and turns
the logits straight into their gradient, scaled by 1 / (number of labelled rows) for "mean". It then
adds the chunk's share to grad_hidden and grad_weight (accumulated in fp32) and drops the logits. The
backward only multiplies the saved gradients by the incoming scalar. Peak extra memory is one chunk of
logits plus an fp32 V x D accumulator, instead of N x V logits, their softmax and their gradient.

Numerics follow Hugging Face: the logits come out of the matmul in the input dtype (lm_head in bf16)
and are upcast to fp32 for the loss. A label equal to ignore_index adds nothing; "mean" divides by the
number of other labels, and returns 0 (not NaN) when every label is ignored.

Two per-chunk steps share the chunk loop. `linear_cross_entropy_ref` does the step in torch: the CPU
path and the test oracle, chunked too, so CPU memory stays bounded. `linear_cross_entropy_triton` does it
with one kernel per chunk: an online logsumexp over vocabulary tiles plus the target logit, then the
gradient written over the chunk's logits buffer (ours, not an input). The matmuls stay in torch
(cuBLAS), as in Liger-Kernel.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the module still imports, only linear_cross_entropy_ref can run
    from ._no_triton import triton, tl


def _chunk_step_torch(logits, labels, scale, ignore_index):
    """logits (C, V) in the input dtype -> per-row loss (C,) fp32, and the loss gradient (C, V) in place of them.
    Every C x V step works in place: the chunk's logits are the only C x V buffer (two for bf16 input)."""
    z = logits.float()  # (C, V) HF upcasts; a copy for bf16, the buffer itself (ours) for fp32
    keep = labels != ignore_index  # (C,)
    target = torch.where(keep, labels, 0)  # (C,) any valid index for ignored rows, zeroed below
    target_logit = z.gather(1, target[:, None])[:, 0]  # (C,)
    m = z.amax(dim=-1, keepdim=True)  # (C, 1)
    p = z.sub_(m).exp_()  # (C, V) softmax numerators, shifted by the row max for stability
    total = p.sum(dim=-1, keepdim=True)  # (C, 1)
    loss = torch.where(keep, m[:, 0] + total[:, 0].log() - target_logit, 0.0)  # (C,) logsumexp - target
    grad = p.div_(total)  # (C, V) softmax
    grad[torch.arange(len(target), device=z.device), target] -= 1.0
    grad.mul_((keep * scale)[:, None])  # ignored rows get no gradient
    return loss, logits.copy_(grad)


@triton.jit
def _ce_chunk_kernel(LOGITS, LABELS, LOSS, SCALE, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            tl.store(base + start + cols, tl.zeros([BLOCK_V], tl.float32).to(LOGITS.dtype.element_ty),
                     mask=start + cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        # pass 1: online logsumexp over vocabulary tiles (the first tile holds a real logit, so m is
        # finite from then on and the -inf padding of the last tile adds exp(-inf) = 0)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(base + label).to(tl.float32)
        tl.store(LOSS + row, lse - target)
        # pass 2: overwrite the logits with (softmax - onehot) * scale
        scale = tl.load(SCALE)
        for start in range(0, V, BLOCK_V):
            z = tl.load(base + start + cols, mask=start + cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)
            tl.store(base + start + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=start + cols < V)


def _chunk_step_triton(logits, labels, scale, ignore_index):
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)  # (C,)
    block = min(triton.next_power_of_2(V), 32 if logits.device.type == "cpu" else 4096)  # tails under the interpreter
    _ce_chunk_kernel[(C,)](logits, labels, loss, scale, logits.stride(0), V, ignore_index, BLOCK_V=block,
                           num_warps=8 if block >= 2048 else 4)
    return loss, logits


def _addmm_fp32(acc, a, b):
    """acc += a @ b, acc fp32: products in the inputs' dtype, sums in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:  # cuBLAS bf16/fp16 GEMM that accumulates into an fp32 output
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # CPU has no mixed-dtype GEMM; upcasting bf16/fp16 is exact
        acc.addmm_(a.float(), b.float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, step, need_grad):
        N, D = hidden.shape
        V = weight.shape[0]
        keep = labels != ignore_index  # (N,)
        # a 1-element tensor, no host sync; all rows ignored -> scale 1 and a loss of 0
        scale = 1.0 / keep.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        scale = scale.reshape(1)  # (1,)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None  # (N, D)
        grad_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_grad else None  # (V, D)
        for start in range(0, N, chunk_size):
            h = hidden[start:start + chunk_size]  # (C, D)
            logits = h @ weight.T  # (C, V) in the input dtype, like HF's lm_head; upcast inside the step
            rows_loss, grad = step(logits, labels[start:start + chunk_size], scale, ignore_index)  # (C,), (C, V)
            loss += rows_loss.sum()
            if need_grad:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk_size])  # (C, D)
                _addmm_fp32(grad_weight, grad.T, h)  # (V, D)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss * scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # loss.backward() passes 1: then skip a V x D copy (costs one host sync)
            grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _apply(hidden, weight, labels, ignore_index, reduction, chunk_size, step):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({hidden.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden {hidden.dtype} and weight {weight.dtype} dtypes differ")
    if not hidden.device == weight.device == labels.device:
        raise ValueError(f"hidden, weight, labels on different devices: {hidden.device}, {weight.device}, {labels.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bad.any():  # one host sync per call; an out-of-range label would read out of bounds in the kernel
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if chunk_size is None:
        # the largest power of two with at most 2^26 logits per chunk (256 MiB in fp32): 256 rows for a
        # 152k vocabulary, enough rows for the matmuls to be compute-bound rather than re-reading weight
        chunk_size = 1 << max(0, (2**26 // V).bit_length() - 1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, max(1, chunk_size), step,
                                     need_grad)


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    return _apply(hidden, weight, labels, ignore_index, reduction, chunk_size, _chunk_step_torch)


def linear_cross_entropy_triton(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    return _apply(hidden, weight, labels, ignore_index, reduction, chunk_size, _chunk_step_triton)
