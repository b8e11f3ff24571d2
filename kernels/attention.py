"""Attention: a FlashAttention-2 forward and backward in Triton, with GQA and packed documents.

Per query head h (reading key/value head h // (Hq / Hkv), never a repeated copy of K and V):

    S = Q K^T / sqrt(D),   P = softmax(S + mask) row-wise,   O = P V
    mask: causal keeps key j <= query i; packed documents (cu_seqlens) keep only the query's own document.

Forward, one program per block of BLOCK_M queries, streaming BLOCK_N keys at a time (no T x T matrix):
    m' = max(m, rowmax S_blk),  l = l 2^(m - m') + rowsum 2^(S_blk - m'),  acc = acc 2^(m - m') + P_blk V_blk
    O = acc / l,   LSE2 = m + log2 l   (saved in fp32 for the backward; the kernels work in base 2,
                                        exp(x) = 2^(x log2 e), log2 e folded into qk_scale, so m and LSE2
                                        are in units of S log2 e)
Backward, recomputing P = 2^(S log2 e - LSE2) block by block:
    Delta_i = sum_d dO_id O_id
    dV = P^T dO,  dP = dO V^T,  dS = P (dP - Delta),  dK = dS^T Q / sqrt(D),  dQ = dS K / sqrt(D)
  First one program per query block computes dQ (and Delta for its rows, stored for the next kernel).
  Then one program per key block accumulates dK and dV over every query block of every q head that
  shares its kv head (the GQA sum, in registers, no atomics; when that grid is too small to fill the GPU
  the heads are split over a few programs whose fp32 partials are summed after). Each output is written
  exactly once; the price is computing S and dP twice: 7 block matmuls where FlashAttention-2, adding
  dS K into dQ with atomics inside the dK/dV loop, does 5.

Block skipping: a query block visits only the key blocks some of its rows may see (the causal triangle,
its documents). Only blocks at an edge (the diagonal, a document boundary, the tail past T) evaluate the
mask; the blocks that every row sees in full run without it.

Layout: SDPA's, q (B, Hq, T, D), k and v (B, Hkv, T, D), any strides as long as the last one is 1
(otherwise the tensor is copied). The output is stored as (B, T, Hq, D) memory and returned as a
(B, Hq, T, D) view, so merging the heads afterwards is free. Both paths take Tq == Tk only: decoding
with a KV cache is model.attention's, through SDPA and a mask of each row's positions. `attention_ref`,
plain SDPA, is the CPU path and the test oracle.
"""
import math
import os
import weakref

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the module still imports, only attention_ref can run
    from ._no_triton import triton, tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# The last cu_seqlens checked: (weak reference, version counter, T, document bounds or None). A model's
# layers all pass the same tensor, so its values are copied to the host (which waits for every queued
# GPU kernel) and its document bounds built once per batch, not once per layer.
_last_cu_seqlens = (None, None, None, None)


# ----------------------------------------------------------------------------- checks and reference

def _check(q, k, v, cu_seqlens):
    """Raise a ValueError / TypeError that names the problem; shared by both paths."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q dtype {q.dtype} unsupported, use one of {_DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has {B}, k and v have {Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: q has {D}, k and v have {Dk}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads is not a multiple of {Hkv} key/value heads")
    if Tq != Tk:  # decoding with a KV cache is model.attention's, through SDPA with its own mask
        raise ValueError(f"as many queries as keys, got {Tq} queries and {Tk} keys")
    if cu_seqlens is None:
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens on {cu_seqlens.device}, q on {q.device}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs documents along one row: needs B == 1, got B = {B}")
    if _is_last_cu_seqlens(cu_seqlens, Tq):
        return
    cuts = cu_seqlens.tolist()  # a device->host copy: once per batch, see _last_cu_seqlens
    if len(cuts) < 2 or cuts[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least 2 entries, got {cuts[:4]}...")
    if any(b < a for a, b in zip(cuts, cuts[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cuts[-1] != Tq:
        raise ValueError(f"cu_seqlens must end at T = {Tq}, got {cuts[-1]}")
    global _last_cu_seqlens
    if not cu_seqlens.is_inference():  # inference tensors keep no version counter
        _last_cu_seqlens = (weakref.ref(cu_seqlens), cu_seqlens._version, Tq, None)


def _is_last_cu_seqlens(cu_seqlens, T):
    """Whether cu_seqlens is the tensor checked last, unchanged since, for the same T."""
    ref, version, last_T, _ = _last_cu_seqlens
    return ref is not None and ref() is cu_seqlens and (version, last_T) == (cu_seqlens._version, T)


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def attention_ref(q, k, v, causal=True, cu_seqlens=None):
    """SDPA; with cu_seqlens one call per document, so no T x T mask is ever built across documents."""
    _check(q, k, v, cu_seqlens)
    if cu_seqlens is None:
        return _sdpa(q, k, v, causal)  # (B, Hq, Tq, D)
    cuts = cu_seqlens.tolist()
    docs = [_sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal) for s, e in zip(cuts, cuts[1:]) if e > s]
    return torch.cat(docs, dim=2)  # (1, Hq, T, D)


# ----------------------------------------------------------------------------- Triton kernels

def _configs(kind):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) to try. BLOCK_M counts queries, BLOCK_N keys.
    Under the interpreter one small config: tests then cover multi-block loops and tails at tiny T,
    with BLOCK_M != BLOCK_N both ways, and autotuning stays off.

    On sm_90 a warpgroup (4 warps) owns 64 rows of each tile, and for chained dots (scores -> P -> P V)
    Triton stacks every warpgroup along those rows: with 8 warps on a 64-row tile both warpgroups
    compute the same scores. So the rows of the chained tile (queries in fwd and dQ, keys in dK/dV) are
    64 per 4 warps. None of these spills registers at D = 64 or 128 with triton 3.6 (at most 4 bytes with
    3.9): bench/compile_sm90.py, BENCHMARKS.md."""
    if _INTERPRET:
        shapes = [(16, 32, 4, 1)] if kind == "dkdv" else [(32, 16, 4, 1)]
    elif kind == "dkdv":  # a key block (BLOCK_N) keeps K, V, dK, dV on chip while query blocks stream past
        shapes = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)]
    else:  # fwd and dq: a query block keeps Q (and dO, dQ) on chip while key blocks stream past
        shapes = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotune per power-of-two bucket of T, not per T: packed SFT batches change T every step.
_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "VARLEN"]
# Triton compiles a variant per launch for every int argument that is 1 or divisible by 16; these are
# only used in scalar index arithmetic, so one compiled variant serves them all (fewer, faster autotunes;
# a kernel ignores the names it does not take).
_SCALARS = ["H", "GROUP", "HEADS_PER_PROGRAM", "T_BUCKET"]


@triton.jit
def _split(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """[lo, hi): what some row (key) of the block may see; [full_lo, full_hi): what all of them see.
    Returns lo, a, b with masked blocks [lo, a), mask-free whole blocks [a, b), masked blocks [b, hi)."""
    lo = lo // BLOCK * BLOCK
    a = (full_lo + BLOCK - 1) // BLOCK * BLOCK
    b = tl.maximum(full_hi // BLOCK * BLOCK, a)
    return lo, tl.minimum(a, hi), tl.minimum(b, hi)


@triton.jit
def _doc_ranges(start, end, idx, T, DOC_START, DOC_END, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """Positions idx = [start, end) of one block, packed documents or not: each one's document
    [idx_lo, idx_hi), and the union (lo, hi) and intersection (full_lo, full_hi) of those ranges.
    Documents are contiguous: the first position's document starts first, the last one's ends last."""
    if VARLEN:
        idx_lo = tl.load(DOC_START + idx, mask=idx < T, other=0)
        idx_hi = tl.load(DOC_END + idx, mask=idx < T, other=0)
        lo, full_lo = tl.load(DOC_START + start), tl.load(DOC_START + end - 1)
        full_hi, hi = tl.load(DOC_END + start), tl.load(DOC_END + end - 1)
    else:
        idx_lo = tl.zeros([BLOCK], tl.int32)
        idx_hi = tl.zeros([BLOCK], tl.int32) + T
        lo, full_lo, full_hi, hi = 0, 0, T, T
    return idx_lo, idx_hi, lo, full_lo, full_hi, hi


@triton.jit
def _query_block_bounds(start_m, rows, T, DOC_START, DOC_END,
                        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows [start_m, start_m + BLOCK_M): each row sees keys [rows_lo, rows_hi);
    the key blocks to visit, split as in _split."""
    end_m = tl.minimum(start_m + BLOCK_M, T)
    rows_lo, rows_hi, lo, full_lo, full_hi, hi = _doc_ranges(start_m, end_m, rows, T, DOC_START, DOC_END,
                                                             VARLEN, BLOCK_M)
    if CAUSAL:
        rows_hi = tl.minimum(rows_hi, rows + 1)
        full_hi = tl.minimum(full_hi, start_m + 1)
        hi = tl.minimum(hi, end_m)
    lo, a, b = _split(lo, full_lo, full_hi, hi, BLOCK_N)
    return rows_lo, rows_hi, lo, a, b, hi


@triton.jit
def _load_kv(K_head, V_head, stride_kt, stride_vt, cols, offs_d, T, MASKED: tl.constexpr):
    """One block of keys and values; only edge blocks pay for the bounds mask."""
    k_ptrs = K_head + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]  # (BN, D)
    v_ptrs = V_head + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]  # (BN, D)
    if MASKED:
        return tl.load(k_ptrs, mask=cols[:, None] < T, other=0.0), tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
    return tl.load(k_ptrs), tl.load(v_ptrs)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, start, end, T, qk_scale,
                MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        k, v = _load_kv(K_head, V_head, stride_kt, stride_vt, cols, offs_d, T, MASKED)  # (BN, D) each
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN) scores, base-2 units
        if MASKED:
            seen = (cols[None, :] >= rows_lo[:, None]) & (cols[None, :] < rows_hi[:, None])  # (BM, BN)
            # finite, not -inf: a row whose first block is all masked gets m = -1e6 (no inf - inf = NaN), and
            # that junk is scaled by 2^(-1e6 - m) = 0 once a visible key arrives (each row sees itself)
            s = tl.where(seen, s, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        p = tl.exp2(s - m_new[:, None])  # (BM, BN)
        alpha = tl.exp2(m_i - m_new)  # (BM,) rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)  # (BM, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_KEY)
@triton.jit(do_not_specialize=_SCALARS)
def _attn_fwd(Q, K, V, O, LSE, DOC_START, DOC_END,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, GROUP, T, T_BUCKET, qk_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks have the most keys: launch them first so the grid ends on short work
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, HEAD_DIM)
    # int64: B * H * T * D overflows int32 at long T
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_head = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + (h // GROUP).to(tl.int64) * stride_vh
    q_ptrs = Q_head + rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :]  # (BM, D)
    q = tl.load(q_ptrs, mask=rows[:, None] < T, other=0.0)

    rows_lo, rows_hi, lo, a, b_, hi = _query_block_bounds(start_m, rows, T, DOC_START, DOC_END,
                                                          CAUSAL, VARLEN, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, lo, a,
                                T, qk_scale, True, BLOCK_N, HEAD_DIM, PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, a, b_,
                                T, qk_scale, False, BLOCK_N, HEAD_DIM, PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, b_, hi,
                                T, qk_scale, True, BLOCK_N, HEAD_DIM, PREC)

    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + rows.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]  # (BM, D)
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=rows[:, None] < T)
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rows < T)  # (BM,) base 2, scaled


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qh, stride_qt, stride_doh, stride_dot,
                 heads, cols_lo, cols_hi, start, end, T, qk_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Query blocks [start, end) of `heads` consecutive q heads, in one flat loop: a loop over heads
    around a loop over blocks keeps more values live and spills registers at D = 128 on sm_90.
    Works on transposed tiles (keys x queries) so that dV += P^T dO and dK += dS^T Q need no transpose."""
    offs_d = tl.arange(0, HEAD_DIM)
    blocks = tl.cdiv(end - start, BLOCK_M)
    for i in range(0, heads * blocks):
        g = i // blocks  # the q head, counted from the program's first
        rows = start + (i - g * blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        q_ptrs = Q_head + g.to(tl.int64) * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO_head + g.to(tl.int64) * stride_doh + rows.to(tl.int64)[:, None] * stride_dot + offs_d[None, :]
        lse_ptrs = LSE_head + g.to(tl.int64) * T + rows  # (BM,) LSE and Delta are (B, H, T)
        delta_ptrs = DELTA_head + g.to(tl.int64) * T + rows  # (BM,)
        if MASKED:
            q = tl.load(q_ptrs, mask=rows[:, None] < T, other=0.0)  # (BM, D)
            do = tl.load(do_ptrs, mask=rows[:, None] < T, other=0.0)  # (BM, D)
            lse2 = tl.load(lse_ptrs, mask=rows < T, other=0.0)
            delta = tl.load(delta_ptrs, mask=rows < T, other=0.0)
        else:
            q, do, lse2, delta = tl.load(q_ptrs), tl.load(do_ptrs), tl.load(lse_ptrs), tl.load(delta_ptrs)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BN, BM) base-2 scores
        p_t = tl.exp2(s_t - lse2[None, :])  # (BN, BM) P recomputed from the saved LSE
        if MASKED:
            seen = (rows[None, :] >= cols_lo[:, None]) & (rows[None, :] < cols_hi[:, None])  # (BN, BM)
            p_t = tl.where(seen, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)  # (BN, D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])  # (BN, BM)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)  # (BN, D)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY)
@triton.jit(do_not_specialize=_SCALARS)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dks, stride_dkb, stride_dkh, stride_dkt, stride_dvs, stride_dvb, stride_dvh, stride_dvt,
                   H, GROUP, HEADS_PER_PROGRAM, T, T_BUCKET, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    H_KV = H // GROUP
    b, h_kv = bh // H_KV, bh % H_KV
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
                + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
                + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)

    # each key is seen by queries [cols_lo, cols_hi); the query blocks to visit, as in _query_block_bounds
    end_n = tl.minimum(start_n + BLOCK_N, T)
    cols_lo, cols_hi, lo, full_lo, full_hi, hi = _doc_ranges(start_n, end_n, cols, T, DOC_START, DOC_END,
                                                             VARLEN, BLOCK_N)
    if CAUSAL:
        cols_lo = tl.maximum(cols_lo, cols)
        lo = tl.maximum(lo, start_n)
        full_lo = tl.maximum(full_lo, end_n - 1)
    lo, a, b_ = _split(lo, full_lo, full_hi, hi, BLOCK_M)

    # every q head reading this kv head (or this program's share of them) adds to dK, dV
    split = tl.program_id(2)
    h = h_kv * GROUP + split * HEADS_PER_PROGRAM  # the first of them
    Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DO_head = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    LSE_head = LSE + (b * H + h).to(tl.int64) * T
    DELTA_head = DELTA + (b * H + h).to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qh, stride_qt, stride_doh,
                          stride_dot, HEADS_PER_PROGRAM, cols_lo, cols_hi, lo, a, T, qk_scale, True, BLOCK_M,
                          HEAD_DIM, PREC)
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qh, stride_qt, stride_doh,
                          stride_dot, HEADS_PER_PROGRAM, cols_lo, cols_hi, a, b_, T, qk_scale, False, BLOCK_M,
                          HEAD_DIM, PREC)
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, stride_qh, stride_qt, stride_doh,
                          stride_dot, HEADS_PER_PROGRAM, cols_lo, cols_hi, b_, hi, T, qk_scale, True, BLOCK_M,
                          HEAD_DIM, PREC)

    dk_ptrs = DK + split.to(tl.int64) * stride_dks + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh \
        + cols.to(tl.int64)[:, None] * stride_dkt + offs_d[None, :]  # (BN, D)
    dv_ptrs = DV + split.to(tl.int64) * stride_dvs + b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh \
        + cols.to(tl.int64)[:, None] * stride_dvt + offs_d[None, :]  # (BN, D)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None] < T)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < T)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, start, end, T,
               qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        k, v = _load_kv(K_head, V_head, stride_kt, stride_vt, cols, offs_d, T, MASKED)  # (BN, D) each
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN)
        p = tl.exp2(s - lse2[:, None])  # (BM, BN)
        if MASKED:
            seen = (cols[None, :] >= rows_lo[:, None]) & (cols[None, :] < rows_hi[:, None])  # (BM, BN)
            p = tl.where(seen, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)  # (BM, D)
    return dq


@triton.autotune(configs=_configs("dq"), key=_KEY)
@triton.jit(do_not_specialize=_SCALARS)
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                 stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
                 H, GROUP, T, T_BUCKET, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one query block, and Delta for its rows, stored for the dK/dV kernel that runs next."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs = rows.to(tl.int64)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs * stride_qt + offs_d,
                mask=rows[:, None] < T, other=0.0)  # (BM, D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs * stride_ot + offs_d,
                mask=rows[:, None] < T, other=0.0)  # (BM, D)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs * stride_dot + offs_d,
                 mask=rows[:, None] < T, other=0.0)  # (BM, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)  # (BM,)
    K_head = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    V_head = V + b.to(tl.int64) * stride_vb + (h // GROUP).to(tl.int64) * stride_vh

    rows_lo, rows_hi, lo, a, b_, hi = _query_block_bounds(start_m, rows, T, DOC_START, DOC_END,
                                                          CAUSAL, VARLEN, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, lo, a, T,
                    qk_scale, True, BLOCK_N, HEAD_DIM, PREC)
    dq = _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, a, b_, T,
                    qk_scale, False, BLOCK_N, HEAD_DIM, PREC)
    dq = _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows_lo, rows_hi, b_, hi, T,
                    qk_scale, True, BLOCK_N, HEAD_DIM, PREC)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs * stride_dqt + offs_d,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < T)


# ----------------------------------------------------------------------------- autograd + entry point

def _doc_bounds(cu_seqlens, T):
    """Start and end of the document holding each position: a block reads its document range in 2 loads.
    Built once per cu_seqlens tensor (see _last_cu_seqlens), not once per layer."""
    global _last_cu_seqlens
    if _is_last_cu_seqlens(cu_seqlens, T) and _last_cu_seqlens[3] is not None:
        return _last_cu_seqlens[3]
    cu = cu_seqlens.to(torch.int32)
    pos = torch.arange(T, dtype=torch.int32, device=cu.device)  # (T,)
    doc = torch.searchsorted(cu[1:], pos, right=True)  # (T,) index of the document holding each position
    bounds = cu[doc].contiguous(), cu[doc + 1].contiguous()  # (T,), (T,)
    if _is_last_cu_seqlens(cu_seqlens, T):
        _last_cu_seqlens = (*_last_cu_seqlens[:3], bounds)
    return bounds


def _dkdv_split(T, B, Hkv, group, device):
    """Into how many programs the dK/dV kernel splits each kv head's group of q heads. One program per
    (key block, kv head) sums over the whole group; short T and few kv heads leave SMs idle, so then
    the group is split and the programs' fp32 partials summed after. Counted with 128-key blocks, the
    largest of the configs; 4 "SMs" under the interpreter, so that small tests take both paths."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return next(s for s in range(1, group + 1) if group % s == 0 and
                (triton.cdiv(T, 128) * B * Hkv * s >= 2 * sms or s == group))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, cu_seqlens):
        B, H, T, D = q.shape
        group = H // k.shape[1]
        varlen = cu_seqlens is not None
        doc_start, doc_end = _doc_bounds(cu_seqlens, T) if varlen else (None, None)
        sm_scale = 1.0 / math.sqrt(D)
        # fp32 tl.dot defaults to TF32 on GPUs; fp32 inputs ask for full precision instead
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        o = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, T, D) view
        lse2 = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # (B, H, T)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd[grid](q, k, v, o, lse2, doc_start, doc_end,
                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                        H, group, T, triton.next_power_of_2(T), sm_scale * _LOG2E,
                        HEAD_DIM=D, CAUSAL=causal, VARLEN=varlen, PREC=prec)
        ctx.save_for_backward(q, k, v, o, lse2, doc_start, doc_end)
        ctx.causal, ctx.varlen, ctx.prec = causal, varlen, prec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, doc_start, doc_end = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        group = H // Hkv
        sm_scale = 1.0 / math.sqrt(D)
        if do.stride(-1) != 1:
            do = do.contiguous()
        args = dict(HEAD_DIM=D, CAUSAL=ctx.causal, VARLEN=ctx.varlen, PREC=ctx.prec)
        # dQ first: it also writes Delta, which dK/dV reads
        dq, delta = torch.empty_like(q), torch.empty_like(lse2)  # (B, H, T, D), (B, H, T)
        grid_m = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_bwd_dq[grid_m](q, k, v, o, do, lse2, delta, dq, doc_start, doc_end,
                             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3],
                             *dq.stride()[:3], H, group, T, triton.next_power_of_2(T), sm_scale * _LOG2E, sm_scale,
                             **args)
        split = _dkdv_split(T, B, Hkv, group, q.device)
        if split == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dk_out, dv_out = dk.unsqueeze(0), dv.unsqueeze(0)  # (1, B, Hkv, T, D) views
        else:  # one buffer for both, so that one sum and one cast finish them
            dkv_out = torch.empty(split, 2, B, Hkv, T, D, dtype=torch.float32, device=q.device)  # (S, 2, B, Hkv, T, D)
            dk_out, dv_out = dkv_out[:, 0], dkv_out[:, 1]  # (S, B, Hkv, T, D) views
        grid_n = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv, split)  # noqa: E731
        _attn_bwd_dkdv[grid_n](q, k, v, do, lse2, delta, dk_out, dv_out, doc_start, doc_end,
                               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                               *dk_out.stride()[:4], *dv_out.stride()[:4],
                               H, group, group // split, T, triton.next_power_of_2(T), sm_scale * _LOG2E, sm_scale,
                               **args)
        if split > 1:
            dk, dv = dkv_out.sum(0).to(k.dtype).unbind(0)  # (B, Hkv, T, D) each
        return dq, dk, dv, None, None


def attention_triton(q, k, v, causal=True, cu_seqlens=None):
    """Triton attention (training, prefill, scoring: Tq == Tk)."""
    _check(q, k, v, cu_seqlens)
    if q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"head dim {q.shape[-1]} unsupported by the Triton kernel: use 16, 32, 64 or 128")
    # the kernels take any strides but a unit last one (whole rows are loaded as vectors)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _Attention.apply(q, k, v, causal, cu_seqlens)
