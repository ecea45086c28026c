"""Fused edited attention in Triton: a prefill kernel (BLOCK_M query rows of one head per
program) and a decode kernel (flash-decoding: the query heads of one KV head packed into the M
dimension, the keys split over programs, then a combine step). Both apply PAI on score tiles,
keep VAR's group partials in the online softmax, scale heads in the epilogue, and write the
requested statistics. The math is the one of reference.py; tests hold one against the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .edits import AttentionEdits, check_edits, check_inputs
from .triton_common import NEG_BIG, _attend_tile, _finish_rows, _last_row_kernel, _n_image

MAX_SPLITS = 32  # decode splits over the keys; a constexpr so the combine never recompiles


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, KeyStart, ColGroup, ImageGain, GainRows, VarRows, NImage, HeadScale,
    GroupMass, LastStats,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_om, stride_oh,
    H, GQA, NQ, NK, qk_scale, keep, rho, summ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAI: tl.constexpr, NEED_GROUPS: tl.constexpr, HAS_VAR: tl.constexpr,
    HAS_HEAD_SCALE: tl.constexpr, WANT_MASS: tl.constexpr, WANT_LAST: tl.constexpr,
    HAS_N_IMAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Q, BLOCK_M), B*H): BLOCK_M query rows of head h of batch row b."""
    # Last row blocks see the most keys: start them first so the tail of the grid is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < NQ
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b64 * stride_kb + (h // GQA) * stride_kh + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + (h // GQA) * stride_vh + offs_d[None, :]
    group_ptrs = ColGroup + b64 * NK

    alpha = tl.zeros([BLOCK_M], tl.float32)
    gain_row = rows < 0
    if HAS_PAI:
        alpha += tl.load(ImageGain + b * H + h)
        gain_row = tl.load(GainRows + b * NQ + rows, mask=row_ok, other=0) != 0

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    l_sv = tl.zeros([BLOCK_M], tl.float32)
    l_u = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_VAR:
        acc_s = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc_u = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    else:  # never read: keep the loop-carried state small
        acc_s = tl.zeros([1, 1], tl.float32)
        acc_u = tl.zeros([1, 1], tl.float32)

    # Row i sees columns key_start .. diag + i. Tiles that end before the first row's limit
    # need no mask; the rest (up to the last row's limit) are masked.
    key_start = tl.load(KeyStart + b).to(tl.int32)
    diag = NK - NQ
    full_end = diag + pid_m * BLOCK_M + 1
    n_full = key_start + tl.maximum(full_end - key_start, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(diag + (pid_m + 1) * BLOCK_M, NK)
    for start_n in range(key_start, n_full, BLOCK_N):
        m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u = _attend_tile(
            m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u,
            q, k_ptrs, v_ptrs, group_ptrs, start_n, stride_kn, stride_vn,
            rows, alpha, gain_row, diag, NK, qk_scale,
            BLOCK_N, False, HAS_PAI, NEED_GROUPS, HAS_VAR, DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(n_full, hi, BLOCK_N):
        m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u = _attend_tile(
            m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u,
            q, k_ptrs, v_ptrs, group_ptrs, start_n, stride_kn, stride_vn,
            rows, alpha, gain_row, diag, NK, qk_scale,
            BLOCK_N, True, HAS_PAI, NEED_GROUPS, HAS_VAR, DOT_PRECISION,
        )  # fmt: skip

    var_row = rows < 0
    n_img = 0.0
    if HAS_VAR:
        var_row = tl.load(VarRows + b * NQ + rows, mask=row_ok, other=0) != 0
        n_img = _n_image(NImage, group_ptrs, b, NK, HAS_N_IMAGE, 1024)
    head_scale = tl.zeros([BLOCK_M], tl.float32)
    if HAS_HEAD_SCALE:
        head_scale += tl.load(HeadScale + b * H + h)
    out = _finish_rows(
        acc, acc_s, acc_u, m_i, l_i, l_t, l_sv, l_u,
        var_row, n_img, keep, rho, summ, head_scale,
        GroupMass, LastStats, bh * NQ + rows, bh + rows * 0, row_ok, rows == NQ - 1,
        HAS_VAR, HAS_HEAD_SCALE, WANT_MASS, WANT_LAST,
    )  # fmt: skip
    o_ptrs = Out + b64 * stride_ob + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_split_kernel(
    Q, K, V, KeyStart, ColGroup, ImageGain, GainRows, PartM, PartL, PartAcc,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, GQA, NQ, NK, split_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAI: tl.constexpr, NEED_GROUPS: tl.constexpr, HAS_VAR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (B*Hkv, splits). The GQA*Q query rows of one KV head share each K/V tile.

    Partials per (row, split): PartM [R, S] running max, PartL [R, S, 4] sums (all, text sink,
    visual sink, non-sink image), PartAcc [R, S, NACC, D] outputs (all, sink, image), R = B*H*Q.
    """
    bk = tl.program_id(0)
    split = tl.program_id(1)
    n_kv = H // GQA
    b = bk // n_kv
    b64 = b.to(tl.int64)
    hk = bk % n_kv
    packed = tl.arange(0, BLOCK_M)
    row_ok = packed < GQA * NQ
    h = hk * GQA + packed // NQ  # [M] query head of each packed row
    rows = packed % NQ  # [M] query row of each packed row
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b64 * stride_qb + h[:, None] * stride_qh + rows[:, None] * stride_qm
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_d[None, :]

    alpha = tl.zeros([BLOCK_M], tl.float32)
    gain_row = packed < 0
    if HAS_PAI:
        alpha = tl.load(ImageGain + b * H + h, mask=row_ok, other=0.0)
        gain_row = tl.load(GainRows + b * NQ + rows, mask=row_ok, other=0) != 0

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    l_sv = tl.zeros([BLOCK_M], tl.float32)
    l_u = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_VAR:
        acc_s = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc_u = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    else:  # never read: keep the loop-carried state small
        acc_s = tl.zeros([1, 1], tl.float32)
        acc_u = tl.zeros([1, 1], tl.float32)

    lo = tl.maximum(split * split_len, tl.load(KeyStart + b).to(tl.int32))
    hi = tl.minimum((split + 1) * split_len, NK)
    for start_n in range(lo, hi, BLOCK_N):
        # Masked: causality for Q > 1 and the split's own end (the next split starts there).
        m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u = _attend_tile(
            m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u,
            q, k_ptrs, v_ptrs, ColGroup + b64 * NK, start_n, stride_kn, stride_vn,
            rows, alpha, gain_row, NK - NQ, hi, qk_scale,
            BLOCK_N, True, HAS_PAI, NEED_GROUPS, HAS_VAR, DOT_PRECISION,
        )  # fmt: skip

    part = ((b * H + h) * NQ + rows) * num_splits + split  # [M]
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part * 4, l_i, mask=row_ok)
    if NEED_GROUPS:
        tl.store(PartL + part * 4 + 1, l_t, mask=row_ok)
        tl.store(PartL + part * 4 + 2, l_sv, mask=row_ok)
        tl.store(PartL + part * 4 + 3, l_u, mask=row_ok)
    n_acc = 3 if HAS_VAR else 1
    acc_ptrs = PartAcc + (part * n_acc)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=row_ok[:, None])
    if HAS_VAR:
        tl.store(acc_ptrs + HEAD_DIM, acc_s, mask=row_ok[:, None])
        tl.store(acc_ptrs + 2 * HEAD_DIM, acc_u, mask=row_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    PartM, PartL, PartAcc, Out, ColGroup, VarRows, NImage, HeadScale, GroupMass, LastStats,
    stride_ob, stride_om, stride_oh,
    H, NQ, NK, num_splits, keep, rho, summ,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, NEED_GROUPS: tl.constexpr,
    HAS_VAR: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr, WANT_MASS: tl.constexpr,
    WANT_LAST: tl.constexpr, HAS_N_IMAGE: tl.constexpr,
):  # fmt: skip
    """Grid (B*H*Q,): merge one row's split partials per group, then the shared epilogue.
    Rows are kept as [1]-vectors so the epilogue is the prefill one."""
    row = tl.program_id(0)
    b = row // (H * NQ)
    h = (row // NQ) % H
    qi = row % NQ
    one = tl.zeros([1], tl.int32)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    part = row * num_splits + offs_s  # [S]
    m_s = tl.load(PartM + part, mask=s_ok, other=NEG_BIG)
    m_i = tl.max(m_s, 0, keep_dims=True)  # [1]
    w = tl.where(s_ok, tl.exp2(m_s - m_i), 0.0)  # [S] rescale each split to the common max
    l_i = tl.sum(w * tl.load(PartL + part * 4, mask=s_ok, other=0.0), 0, keep_dims=True)
    l_t = tl.zeros([1], tl.float32)
    l_sv = tl.zeros([1], tl.float32)
    l_u = tl.zeros([1], tl.float32)
    if NEED_GROUPS:
        l_t = tl.sum(w * tl.load(PartL + part * 4 + 1, mask=s_ok, other=0.0), 0, keep_dims=True)
        l_sv = tl.sum(w * tl.load(PartL + part * 4 + 2, mask=s_ok, other=0.0), 0, keep_dims=True)
        l_u = tl.sum(w * tl.load(PartL + part * 4 + 3, mask=s_ok, other=0.0), 0, keep_dims=True)
    n_acc = 3 if HAS_VAR else 1
    acc_ptrs = PartAcc + (part * n_acc)[:, None] * HEAD_DIM + offs_d[None, :]  # [S, D]
    acc = tl.sum(w[:, None] * tl.load(acc_ptrs, mask=s_ok[:, None], other=0.0), 0, keep_dims=True)
    acc_s = acc
    acc_u = acc
    var_row = one < 0
    n_img = 0.0
    if HAS_VAR:
        part_s = tl.load(acc_ptrs + HEAD_DIM, mask=s_ok[:, None], other=0.0)
        acc_s = tl.sum(w[:, None] * part_s, 0, keep_dims=True)
        part_u = tl.load(acc_ptrs + 2 * HEAD_DIM, mask=s_ok[:, None], other=0.0)
        acc_u = tl.sum(w[:, None] * part_u, 0, keep_dims=True)
        var_row = tl.load(VarRows + b * NQ + qi + one) != 0
        n_img = _n_image(NImage, ColGroup + b.to(tl.int64) * NK, b, NK, HAS_N_IMAGE, 1024)
    head_scale = tl.zeros([1], tl.float32)
    if HAS_HEAD_SCALE:
        head_scale += tl.load(HeadScale + b * H + h)
    out = _finish_rows(
        acc, acc_s, acc_u, m_i, l_i, l_t, l_sv, l_u,
        var_row, n_img, keep, rho, summ, head_scale,
        GroupMass, LastStats, row + one, b * H + h + one, one == 0, qi + one == NQ - 1,
        HAS_VAR, HAS_HEAD_SCALE, WANT_MASS, WANT_LAST,
    )  # fmt: skip
    o_ptrs = Out + b.to(tl.int64) * stride_ob + qi * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty))


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel (a fixed heuristic, never keyed on K)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2  # decode only: how finely the keys are split


DECODE_MAX_ROWS = 16  # GQA*Q packed rows up to which the decode kernel is used


def prefill_config(head_dim: int, dtype: torch.dtype, var_on: bool, device: torch.device):
    """Heuristic tiles for the prefill kernel, by head dim, dtype and VAR's extra accumulators."""
    if device.type != "cuda":  # TRITON_INTERPRET on CPU: small tiles, several per row
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32:  # twice the shared memory per tile
        return KernelConfig(64, 32, 4, 2)
    if var_on:  # three [BLOCK_M, D] accumulators: 8 warps share them without spilling
        return KernelConfig(64, 32, 8, 3) if head_dim <= 128 else KernelConfig(32, 32, 4, 2)
    if head_dim <= 64:
        return KernelConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return KernelConfig(128, 64, 8, 3)
    return KernelConfig(64, 32, 8, 2)


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Heuristic tiles for the decode split kernel (block_m is set by the GQA*Q rows)."""
    if device.type != "cuda":
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(16, 32, 4, 2)
    return KernelConfig(16, 64, 4, 3)


def _check(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, scale: float, edits):
    check_inputs(q, k, v, key_start, scale)
    B, H, Q, D = q.shape
    check_edits(edits, B, H, Q, k.shape[2], q.device)
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim in [16, 256], got {D}")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _edit_tensors(edits: AttentionEdits, dummy: Tensor) -> dict[str, Tensor]:
    """Edit tensors as the kernels read them; an absent one becomes a never-read dummy."""

    def flags(t: Tensor | None) -> Tensor:
        return dummy if t is None else t.contiguous().view(torch.uint8)

    def plain(t: Tensor | None) -> Tensor:
        return dummy if t is None else t.contiguous()

    return {
        "ColGroup": plain(edits.col_group),
        "ImageGain": plain(edits.image_gain),
        "GainRows": flags(edits.gain_rows),
        "VarRows": flags(edits.var_rows if edits.var_on else None),
        "NImage": plain(edits.n_image),  # None: the kernels count image columns themselves
        "HeadScale": plain(edits.head_scale),
    }


def _flags(q: Tensor, edits: AttentionEdits) -> dict[str, object]:
    return {
        "HAS_PAI": edits.pai_on,
        "NEED_GROUPS": edits.needs_groups,
        "HAS_VAR": edits.var_on,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _outputs(q: Tensor, K: int, edits: AttentionEdits) -> dict[str, Tensor]:
    B, H, Q, D = q.shape
    f32 = {"dtype": torch.float32, "device": q.device}
    out = {"out": torch.empty(B, Q, H, D, dtype=q.dtype, device=q.device)}
    if edits.want_group_mass:
        out["group_mass"] = torch.empty(B, H, Q, 4, **f32)
    if edits.want_last_row:
        out["last_stats"] = torch.empty(B * H * 4, **f32)  # (m, l, f_sink, f_image) per head
        out["last_row"] = torch.empty(B, H, K, **f32)
    return out


def _stats(q: Tensor, k: Tensor, key_start: Tensor, qk_scale: float, edits, res, dummy):
    """Run the last-row pass if asked and collect the statistics dict."""
    stats = {}
    if edits.want_group_mass:
        stats["group_mass"] = res["group_mass"]
    if edits.want_last_row:
        B, H, Q, D = q.shape
        K = k.shape[2]
        block_n = 64 if q.is_cuda else 16
        t = _edit_tensors(edits, dummy)
        _last_row_kernel[(B * H, triton.cdiv(K, block_n))](
            q, k, key_start, t["ColGroup"], t["ImageGain"], t["GainRows"],
            res["last_stats"], res["last_row"],
            *q.stride()[:3], *k.stride()[:3], H, H // k.shape[1], Q, K, qk_scale,
            HEAD_DIM=D, BLOCK_N=block_n, HAS_PAI=edits.pai_on, HAS_VAR=edits.var_on,
        )  # fmt: skip
        stats["last_row"] = res["last_row"]
    return stats


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor,
    edits: AttentionEdits, config: KernelConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Edited attention with the prefill kernel; same contract as reference.edited_attention."""
    _check(q, k, v, key_start, scale, edits)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Q, D = q.shape
    K = k.shape[2]
    cfg = config or prefill_config(D, q.dtype, edits.var_on, q.device)
    res = _outputs(q, K, edits)
    out = res["out"]
    dummy = key_start
    qk_scale = scale * math.log2(math.e)
    grid = (triton.cdiv(Q, cfg.block_m), B * H)
    _prefill_kernel[grid](
        q, k, v, out, key_start, **_edit_tensors(edits, dummy),
        GroupMass=res.get("group_mass", dummy), LastStats=res.get("last_stats", dummy),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
        H=H, GQA=H // k.shape[1], NQ=Q, NK=K, qk_scale=qk_scale,
        keep=float(edits.var_keep), rho=float(edits.var_rho), summ=float(edits.var_summ),
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_HEAD_SCALE=edits.head_scale is not None, WANT_MASS=edits.want_group_mass,
        WANT_LAST=edits.want_last_row, HAS_N_IMAGE=edits.n_image is not None,
        **_flags(q, edits),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, _stats(q, k, key_start, qk_scale, edits, res, dummy)


def _num_splits(B: int, n_kv: int, K: int, cfg: KernelConfig, device: torch.device):
    """(splits, split_len): about cfg.programs_per_sm programs per SM, whole tiles per split."""
    on_gpu = device.type == "cuda"
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
    block_n = cfg.block_n
    wanted = triton.cdiv(cfg.programs_per_sm * n_sm, B * n_kv)
    splits = min(MAX_SPLITS, wanted, triton.cdiv(K, block_n))
    split_len = triton.cdiv(triton.cdiv(K, max(splits, 1)), block_n) * block_n
    return triton.cdiv(K, split_len), split_len


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor,
    edits: AttentionEdits, config: KernelConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Edited attention with the split-K decode kernel (GQA*Q <= 64 packed rows)."""
    _check(q, k, v, key_start, scale, edits)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Q, D = q.shape
    n_kv, K = k.shape[1], k.shape[2]
    if (H // n_kv) * Q > 64:
        raise ValueError(f"decode kernel packs GQA*Q <= 64 rows, got {(H // n_kv) * Q}")
    cfg = config or decode_config(D, q.dtype, q.device)
    block_m = max(16, triton.next_power_of_2((H // n_kv) * Q))
    splits, split_len = _num_splits(B, n_kv, K, cfg, q.device)
    n_acc = 3 if edits.var_on else 1
    f32 = {"dtype": torch.float32, "device": q.device}
    part_m = torch.empty(B * H * Q * splits, **f32)
    part_l = torch.empty(B * H * Q * splits * 4, **f32)
    part_acc = torch.empty(B * H * Q * splits * n_acc * D, **f32)
    res = _outputs(q, K, edits)
    out = res["out"]
    dummy = key_start
    t = _edit_tensors(edits, dummy)
    qk_scale = scale * math.log2(math.e)
    flags = _flags(q, edits)
    _decode_split_kernel[(B * n_kv, splits)](
        q, k, v, key_start, t["ColGroup"], t["ImageGain"], t["GainRows"], part_m, part_l, part_acc,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, H // n_kv, Q, K, split_len, splits, qk_scale,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=cfg.block_n, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _decode_combine_kernel[(B * H * Q,)](
        part_m, part_l, part_acc, out, t["ColGroup"], t["VarRows"], t["NImage"], t["HeadScale"],
        res.get("group_mass", dummy), res.get("last_stats", dummy),
        out.stride(0), out.stride(1), out.stride(2),
        H, Q, K, splits, float(edits.var_keep), float(edits.var_rho), float(edits.var_summ),
        HEAD_DIM=D, BLOCK_S=MAX_SPLITS, NEED_GROUPS=flags["NEED_GROUPS"], HAS_VAR=edits.var_on,
        HAS_HEAD_SCALE=edits.head_scale is not None, WANT_MASS=edits.want_group_mass,
        WANT_LAST=edits.want_last_row, HAS_N_IMAGE=edits.n_image is not None,
        num_warps=4 if q.is_cuda else 1,
    )  # fmt: skip
    return out, _stats(q, k, key_start, qk_scale, edits, res, dummy)


def edited_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor, edits: AttentionEdits
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pick the decode kernel for few packed query rows, the prefill kernel otherwise."""
    if (q.shape[1] // k.shape[1]) * q.shape[2] <= DECODE_MAX_ROWS:
        return decode_attention(q, k, v, scale=scale, key_start=key_start, edits=edits)
    return prefill_attention(q, k, v, scale=scale, key_start=key_start, edits=edits)
