"""The decode kernel (flash-decoding): few query rows, the keys split over programs, then a
combine step that merges the per-group partials and runs the same epilogue as prefill.
GQA: the query heads of one KV head are packed into the M dimension and share each K/V tile.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .edits import AttentionEdits
from .triton_common import (
    NEG_BIG,
    KernelConfig,
    _attend_tile,
    _finish_rows,
    _n_image,
    _row_var_params,
    allocate_outputs,
    check_launch,
    edit_flags,
    edit_tensors,
    end_stride,
    epilogue_flags,
    finish_stats,
    group_width,
    last_dim_contiguous,
    var_args,
)

MAX_SPLITS = 32  # a constexpr, so the combine kernel never recompiles as K grows
MAX_ROWS = 64  # packed rows (VAR's 3 x GQA x Q) one decode program holds


@triton.jit
def _decode_split_kernel(
    Q, K, V, KeyStart, KeyEnd, end_stride, ColGroup, ImageGain, GainRows, PartM, PartL, PartAcc,
    LastRow,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, GQA, NQ, NK, NG, split_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAI: tl.constexpr, NEED_GROUPS: tl.constexpr, HAS_VAR: tl.constexpr,
    WANT_LAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_END: tl.constexpr,
):  # fmt: skip
    """Grid (B*Hkv, splits). The GQA*Q query rows of one KV head share each K/V tile; with VAR
    they appear three times (acc_id 0 all columns, 1 sinks, 2 non-sink image) in the M rows.

    Partials per (row, split): PartM [R, S] running max, PartL [R, S, 4] sums (all, text sink,
    visual sink, non-sink image), PartAcc [R, S, NACC, D] outputs (all, sink, image), R = B*H*Q.
    HAS_END: row b's keys end at KeyEnd[b * end_stride] <= NK (a preallocated cache; stride 0:
    one end for all rows); splits past it store empty partials.
    """
    bk = tl.program_id(0)
    split = tl.program_id(1)
    n_kv = H // GQA
    b = bk // n_kv
    b64 = b.to(tl.int64)
    hk = bk % n_kv
    n_acc = 3 if HAS_VAR else 1
    packed = tl.arange(0, BLOCK_M)
    acc_id = packed // (GQA * NQ)  # [M] which output the row accumulates
    row_ok = acc_id < n_acc
    r = packed % (GQA * NQ)
    h = hk * GQA + r // NQ  # [M] query head of each packed row
    rows = r % NQ  # [M] query row of each packed row
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
    unused = tl.zeros([1, 1], tl.float32)  # the stacked rows replace acc_s and acc_u
    is_last = row_ok & (acc_id == 0) & (rows == NQ - 1)
    last_ptrs = LastRow + (b * H + h).to(tl.int64) * NK

    end = NK
    if HAS_END:
        end = tl.load(KeyEnd + b * end_stride).to(tl.int32)
    lo = tl.maximum(split * split_len, tl.load(KeyStart + b).to(tl.int32))
    hi = tl.minimum((split + 1) * split_len, end)
    for start_n in range(lo, hi, BLOCK_N):
        # Masked: causality for Q > 1 and the split's own end (the next split starts there).
        m_i, l_i, acc, l_t, l_sv, l_u, _, _ = _attend_tile(
            m_i, l_i, acc, l_t, l_sv, l_u, unused, unused,
            q, k_ptrs, v_ptrs, ColGroup + b64 * NG, start_n, stride_kn, stride_vn,
            rows, alpha, gain_row, acc_id, last_ptrs, is_last, end - NQ, hi, NG, qk_scale,
            BLOCK_N, True, HAS_PAI, NEED_GROUPS, HAS_VAR, True, WANT_LAST, DOT_PRECISION,
        )  # fmt: skip

    part = ((b * H + h) * NQ + rows) * num_splits + split  # [M]
    main = row_ok & (acc_id == 0)
    tl.store(PartM + part, m_i, mask=main)
    tl.store(PartL + part * 4, l_i, mask=main)
    if NEED_GROUPS:
        tl.store(PartL + part * 4 + 1, l_t, mask=main)
        tl.store(PartL + part * 4 + 2, l_sv, mask=main)
        tl.store(PartL + part * 4 + 3, l_u, mask=main)
    acc_ptrs = PartAcc + (part * n_acc + acc_id)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=row_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    PartM, PartL, PartAcc, Out, ColGroup, VarRows, NImage, HeadScale, VarKeep, VarRho, VarSumm,
    GroupMass, LastStats, stride_ob, stride_om, stride_oh,
    H, NQ, NK, NG, num_splits, keep, rho, summ,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, NEED_GROUPS: tl.constexpr,
    HAS_VAR: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr, WANT_MASS: tl.constexpr,
    WANT_LAST: tl.constexpr, HAS_N_IMAGE: tl.constexpr, VAR_PER_ROW: tl.constexpr,
):  # fmt: skip
    """Grid (B*H*Q,): merge one row's split partials per group, then the shared epilogue.
    Rows are kept as [1]-vectors so the epilogue is the prefill one. VAR's keep, rho, summ are
    the scalars, or with VAR_PER_ROW element b of VarKeep, VarRho, VarSumm [B]."""
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
        n_img = _n_image(NImage, ColGroup + b.to(tl.int64) * NG, b, NG, HAS_N_IMAGE, 1024)
        keep, rho, summ = _row_var_params(VarKeep, VarRho, VarSumm, b, keep, rho, summ,
                                          VAR_PER_ROW)  # fmt: skip
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


@functools.cache
def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Heuristic tiles for the split kernel (block_m follows the packed rows; H100-measured)."""
    if device.type != "cuda":
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(16, 32, 4, 2)
    return KernelConfig(16, 64, 4, 3)


@functools.cache
def _sm_count(index: int | None) -> int:
    """SMs of a CUDA device (a hardware constant: asking the driver per call costs host time)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(B: int, n_kv: int, K: int, cfg: KernelConfig, device: torch.device):
    """(splits, split_len): about cfg.programs_per_sm programs per SM, whole tiles per split."""
    n_sm = _sm_count(device.index) if device.type == "cuda" else 4
    wanted = triton.cdiv(cfg.programs_per_sm * n_sm, B * n_kv)
    splits = min(MAX_SPLITS, wanted, triton.cdiv(K, cfg.block_n))
    split_len = triton.cdiv(triton.cdiv(K, max(splits, 1)), cfg.block_n) * cfg.block_n
    return triton.cdiv(K, split_len), split_len


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor,
    edits: AttentionEdits, key_end: Tensor | None = None, config: KernelConfig | None = None,
    validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Edited attention with the split-K decode kernel; same contract as the reference."""
    check_launch(q, k, v, key_start, scale, edits, validate, key_end)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, Q, D = q.shape
    n_kv, K = k.shape[1], k.shape[2]
    n_acc = 3 if edits.var_on else 1
    packed = n_acc * (H // n_kv) * Q
    if packed > MAX_ROWS:
        raise ValueError(
            f"decode kernel packs (3 with VAR) x GQA x Q <= {MAX_ROWS} rows, got {packed}"
        )
    cfg = config or decode_config(D, q.dtype, q.device)
    splits, split_len = _num_splits(B, n_kv, K, cfg, q.device)
    n_part = B * H * Q * splits
    work = torch.empty(n_part * (5 + n_acc * D), dtype=torch.float32, device=q.device)
    part_m, part_l, part_acc = work[:n_part], work[n_part : 5 * n_part], work[5 * n_part :]
    res = allocate_outputs(q, K, edits, dummy=key_start)
    out = res["out"]
    t = edit_tensors(edits, key_start)
    flags = edit_flags(q, edits)
    _decode_split_kernel[(B * n_kv, splits)](
        q, k, v, key_start, key_start if key_end is None else key_end, end_stride(key_end),
        t["ColGroup"], t["ImageGain"], t["GainRows"],
        part_m, part_l, part_acc, res["LastRow"],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, H // n_kv, Q, K, group_width(edits), split_len, splits, scale * math.log2(math.e),
        HEAD_DIM=D, BLOCK_M=max(16, triton.next_power_of_2(packed)), BLOCK_N=cfg.block_n,
        **flags, HAS_END=key_end is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _decode_combine_kernel[(B * H * Q,)](
        part_m, part_l, part_acc, out, t["ColGroup"], t["VarRows"], t["NImage"], t["HeadScale"],
        GroupMass=res["GroupMass"], LastStats=res["LastStats"],
        stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
        H=H, NQ=Q, NK=K, NG=group_width(edits), num_splits=splits, **var_args(edits, B, key_start),
        HEAD_DIM=D, BLOCK_S=MAX_SPLITS, NEED_GROUPS=flags["NEED_GROUPS"], HAS_VAR=edits.var_on,
        WANT_LAST=edits.want_last_row, **epilogue_flags(edits),
        num_warps=4 if q.is_cuda else 1,
    )  # fmt: skip
    return out, finish_stats(res, key_start, edits, key_end)
