"""Attention for a decode step: one query position per row against the whole KV cache, as split-KV Triton kernels
("flash-decoding", Dao et al. 2023). For chat.py on a GPU (extras/fast_inference.py installs it); CPU-only torch has
no Triton, and there attention stays F.scaled_dot_product_attention.

A batch-1 decode step of an 8B Llama has 32 query heads over 8 K/V heads and a cache of a thousand slots or more.
An attention kernel that gives each head (or each group of heads) one program runs 8 to 32 programs on a GPU of
132 multiprocessors, most of which then wait (BENCHMARKS.md profiles both). Here the cache is cut into up to
MAX_SPLITS chunks of slots, and each (row, K/V head, chunk) is one program: it computes the softmax-weighted sum of
its chunk's values for the group of query heads sharing that K/V head, with the chunk's own maximum and sum. A
second kernel rescales the chunks to a common maximum and adds them up: exactly the softmax over all the slots.

    split_kv_attention(q, k, v, keep)   q (B, H, 1, D), k, v (B, Hkv, S, D), keep (B|1, 1, 1, S) bool -> (B, H, 1, D)
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch ships without Triton: decode attention stays SDPA
    triton = None

BLOCK_N = 64  # cache slots per tile
NUM_WARPS = 4  # warps per program of the partials kernel


if triton is not None:
    @triton.jit
    def _decode_partials(q_ptr, k_ptr, v_ptr, keep_ptr, o_ptr, m_ptr, l_ptr, scale, S, n_split, keep_stride,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                         TILES: tl.constexpr):
        """Program (b * HKV + kv head, split): the G query heads of one K/V head against slots
        [split * TILES * BN, (split + 1) * TILES * BN), as an unnormalized output, its row maxima m and sums l
        (fp32)."""
        bh, split = tl.program_id(0), tl.program_id(1)
        g, d = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(q_ptr + (bh * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)  # (GP, D)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for tile in range(TILES):
            n = (split * TILES + tile) * BN + tl.arange(0, BN)
            keep = tl.load(keep_ptr + (bh // HKV) * keep_stride + n, mask=n < S, other=0) != 0  # (BN,)
            offs = bh * S * D + n[:, None] * D + d[None, :]
            k = tl.load(k_ptr + offs, mask=(n < S)[:, None], other=0.0)  # (BN, D)
            s = tl.where(keep[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # (GP, BN) fp32
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at zero
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            v = tl.load(v_ptr + offs, mask=(n < S)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        row = (bh * n_split + split) * GP + g
        tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)

    @triton.jit
    def _decode_combine(o_ptr, m_ptr, l_ptr, out_ptr, n_split,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, NS: tl.constexpr):
        """Program b * H + head: its n_split partial results rescaled to one maximum and normalized."""
        head = tl.program_id(0)
        bh, g = head // G, head % G
        s, d = tl.arange(0, NS), tl.arange(0, D)
        row = (bh * n_split + s) * GP + g
        m = tl.load(m_ptr + row, mask=s < n_split, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=s < n_split, other=0.0)
        o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=(s < n_split)[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
        total = tl.sum(w * l, 0)
        y = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + head * D + d, y.to(out_ptr.dtype.element_ty))

MAX_SPLITS = 32  # chunks of the cache per (row, K/V head); 1,024 slots give 16 chunks of one tile


def split_kv_attention(q, k, v, keep):
    """softmax(q k^T / sqrt(D), slots where keep is False left out) v for one query position per row, where each
    group of H / Hkv query heads reads one K/V head. Inputs as F.scaled_dot_product_attention takes them (bf16 or
    fp16 on a GPU; the kernels accumulate in fp32); keep (B|1, 1, 1, S) is its boolean attn_mask. A row that keeps
    no slot gives zeros."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if T != 1 or H % Hkv or keep.dtype != torch.bool or keep.shape[1:3] != (1, 1) or keep.shape[-1] != S:
        raise ValueError(f"split_kv_attention: one query per row and a (B|1, 1, 1, S) bool mask, got q {tuple(q.shape)}"
                         f", k {tuple(k.shape)}, mask {tuple(keep.shape)} {keep.dtype}")
    G, GP = H // Hkv, max(16, triton.next_power_of_2(H // Hkv))  # tl.dot takes at least 16 rows: heads padded
    tiles = triton.cdiv(S, BLOCK_N * min(MAX_SPLITS, triton.cdiv(S, BLOCK_N)))  # per chunk: a compile-time count
    n_split = triton.cdiv(S, tiles * BLOCK_N)
    o = torch.empty(B * Hkv, n_split, GP, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B * Hkv, n_split, GP, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    keep = keep.reshape(keep.shape[0], S).contiguous().view(torch.uint8)
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    _decode_partials[(B * Hkv, n_split)](q.contiguous(), k.contiguous(), v.contiguous(), keep, o, m, l, D ** -0.5, S,
                                         n_split, S if keep.shape[0] > 1 else 0, HKV=Hkv, G=G, GP=GP, D=D,
                                         BN=BLOCK_N, TILES=tiles, num_warps=NUM_WARPS)
    _decode_combine[(B * H,)](o, m, l, out, n_split, G=G, GP=GP, D=D, NS=triton.next_power_of_2(n_split))
    return out
