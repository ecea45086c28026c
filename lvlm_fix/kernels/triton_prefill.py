"""The prefill kernel: BLOCK_M query rows of one head per program, causal over the keys, with
PAI on score tiles, VAR's group accumulators (only when VAR is on), the head scale in the
epilogue, and the requested statistics. Same contract as reference.edited_attention.
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
    epilogue_flags,
    finish_stats,
    group_width,
    last_dim_contiguous,
    var_args,
)


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, KeyStart, ColGroup, ImageGain, GainRows, VarRows, NImage, HeadScale,
    VarKeep, VarRho, VarSumm, GroupMass, LastStats, LastRow,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_om, stride_oh,
    H, GQA, NQ, NK, NG, qk_scale, keep, rho, summ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PAI: tl.constexpr, NEED_GROUPS: tl.constexpr, HAS_VAR: tl.constexpr,
    HAS_HEAD_SCALE: tl.constexpr, WANT_MASS: tl.constexpr, WANT_LAST: tl.constexpr,
    HAS_N_IMAGE: tl.constexpr, VAR_PER_ROW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Q, BLOCK_M), B*H): BLOCK_M query rows of head h of batch row b.
    VAR's keep, rho, summ are the scalars, or with VAR_PER_ROW element b of VarKeep, VarRho,
    VarSumm [B]."""
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
    group_ptrs = ColGroup + b64 * NG  # col_group [B, NG], NG <= NK

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

    is_last = rows == NQ - 1
    last_ptrs = LastRow + bh.to(tl.int64) * NK + rows * 0  # [M], used where is_last

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
            rows, alpha, gain_row, rows * 0, last_ptrs, is_last, diag, NK, NG, qk_scale,
            BLOCK_N, False, HAS_PAI, NEED_GROUPS, HAS_VAR, False, WANT_LAST, DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(n_full, hi, BLOCK_N):
        m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u = _attend_tile(
            m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u,
            q, k_ptrs, v_ptrs, group_ptrs, start_n, stride_kn, stride_vn,
            rows, alpha, gain_row, rows * 0, last_ptrs, is_last, diag, NK, NG, qk_scale,
            BLOCK_N, True, HAS_PAI, NEED_GROUPS, HAS_VAR, False, WANT_LAST, DOT_PRECISION,
        )  # fmt: skip

    var_row = rows < 0
    n_img = 0.0
    if HAS_VAR:
        var_row = tl.load(VarRows + b * NQ + rows, mask=row_ok, other=0) != 0
        n_img = _n_image(NImage, group_ptrs, b, NG, HAS_N_IMAGE, 1024)
        keep, rho, summ = _row_var_params(VarKeep, VarRho, VarSumm, b, keep, rho, summ,
                                          VAR_PER_ROW)  # fmt: skip
    head_scale = tl.zeros([BLOCK_M], tl.float32)
    if HAS_HEAD_SCALE:
        head_scale += tl.load(HeadScale + b * H + h)
    out = _finish_rows(
        acc, acc_s, acc_u, m_i, l_i, l_t, l_sv, l_u,
        var_row, n_img, keep, rho, summ, head_scale,
        GroupMass, LastStats, bh * NQ + rows, bh + rows * 0, row_ok, is_last,
        HAS_VAR, HAS_HEAD_SCALE, WANT_MASS, WANT_LAST,
    )  # fmt: skip
    o_ptrs = Out + b64 * stride_ob + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@functools.cache
def prefill_config(
    head_dim: int, dtype: torch.dtype, var_on: bool, device: torch.device, rows: int = 64
) -> KernelConfig:
    """Heuristic tiles by head dim, dtype and VAR's two extra accumulators (measured on H100);
    `rows` query rows: a decode step (few rows) gets the smallest row tile tl.dot allows."""
    if device.type != "cuda":  # TRITON_INTERPRET on CPU: small tiles, several per row
        return KernelConfig(16, 16, 1, 1)
    if rows <= 16:
        return KernelConfig(16, 64, 4, 2)
    if dtype == torch.float32:  # twice the shared memory per tile
        return KernelConfig(64, 32, 4, 2)
    if head_dim > 128:
        return KernelConfig(32, 32, 4, 2) if var_on else KernelConfig(64, 32, 8, 2)
    return KernelConfig(64, 32, 4, 3) if var_on else KernelConfig(64, 64, 4, 3)


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor,
    edits: AttentionEdits, config: KernelConfig | None = None, validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Edited attention with the prefill kernel; same contract as reference.edited_attention."""
    check_launch(q, k, v, key_start, scale, edits, validate)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, Q, D = q.shape
    K = k.shape[2]
    cfg = config or prefill_config(D, q.dtype, edits.var_on, q.device, Q)
    res = allocate_outputs(q, K, edits, dummy=key_start)
    out = res["out"]
    _prefill_kernel[(triton.cdiv(Q, cfg.block_m), B * H)](
        q, k, v, out, key_start, **edit_tensors(edits, key_start),
        GroupMass=res["GroupMass"], LastStats=res["LastStats"], LastRow=res["LastRow"],
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
        H=H, GQA=H // k.shape[1], NQ=Q, NK=K, NG=group_width(edits),
        qk_scale=scale * math.log2(math.e), **var_args(edits, B, key_start),
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        **edit_flags(q, edits), **epilogue_flags(edits),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, finish_stats(res, key_start, edits)
