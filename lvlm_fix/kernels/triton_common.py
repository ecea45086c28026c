"""Pieces shared by the prefill and decode kernels: one key tile of the edited online softmax,
the VAR epilogue, the side-output stores, the last-row probability pass; and the launchers'
common checks, argument packing and output allocation.

Scores live in log2 units (s * scale * log2(e)), so exp2 replaces exp. PAI's s + a*|s| is
positively homogeneous, so applying it to log2-scaled scores is the same edit.
Column groups: 0 rest, 1 text sink, 2 visual sink, 3 non-sink image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .edits import AttentionEdits, check_edits, check_inputs, var_columns

# Finite start for the running max: a row that sees no key keeps m = -1e30, p = exp2(-inf) = 0,
# l = 0 and writes zeros instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _attend_tile(
    m_i, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u,  # running state of BLOCK_M rows
    q, k_ptrs, v_ptrs, group_ptrs, start_n, stride_kn, stride_vn,
    rows, alpha, gain_row, acc_id, last_ptrs, is_last, diag, NK, NG, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_PAI: tl.constexpr,
    NEED_GROUPS: tl.constexpr, HAS_VAR: tl.constexpr, STACKED: tl.constexpr,
    WANT_LAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold key columns [start_n, start_n + BLOCK_N) into the state of BLOCK_M query rows.

    q [M, D]; rows [M] query row index (row i sees columns <= diag + i); alpha [M] PAI gain;
    gain_row [M] PAI row flag. MASKED tiles check causality and the end of the keys; unmasked
    tiles are known to be visible to every row (the caller starts at key_start).
    VAR keeps the sink and non-sink-image outputs apart (var.md section 5, design A): in acc_s
    and acc_u, or, when STACKED, in rows of the one accumulator whose acc_id [M] is 1 or 2
    (those rows repeat a query row and keep only their group's columns; decode has rows to
    spare in the M >= 16 tile, so this costs no extra dot).
    WANT_LAST: rows with is_last [M] store their edited log2 scores at last_ptrs [M] + column.
    Column groups are read for columns < NG (the col_group width); later columns are group 0.
    """
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < NK
    if MASKED:
        k = tl.load(k_ptrs + cols[:, None] * stride_kn, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + cols[:, None] * stride_kn)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    if HAS_PAI or NEED_GROUPS:
        group = tl.load(group_ptrs + cols, mask=col_ok & (cols < NG), other=0)  # [N] int8
    if HAS_PAI:
        boost = (group[None, :] >= 2) & gain_row[:, None]
        s = tl.where(boost, s + alpha[:, None] * tl.abs(s), s)
    if MASKED:
        visible = (cols[None, :] <= diag + rows[:, None]) & col_ok[None, :]
        s = tl.where(visible, s, float("-inf"))  # after PAI: masked entries never get a gain
    if WANT_LAST:
        last_mask = is_last[:, None] & col_ok[None, :]
        tl.store(last_ptrs[:, None] + cols[None, :], s, mask=last_mask)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [M, N] fp32
    l_i = l_i * corr + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs + cols[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs + cols[:, None] * stride_vn)
    if NEED_GROUPS:
        l_t = l_t * corr + tl.sum(tl.where(group[None, :] == 1, p, 0.0), 1)
        l_sv = l_sv * corr + tl.sum(tl.where(group[None, :] == 2, p, 0.0), 1)
        l_u = l_u * corr + tl.sum(tl.where(group[None, :] == 3, p, 0.0), 1)
    if HAS_VAR and STACKED:
        sink = (group[None, :] == 1) | (group[None, :] == 2)
        row_id = acc_id[:, None]
        keep = (row_id == 0) | ((row_id == 1) & sink) | ((row_id == 2) & (group[None, :] == 3))
        p_v = tl.where(keep, p, 0.0).to(v.dtype)
    else:
        p_v = p.to(v.dtype)
    acc = tl.dot(p_v, v, acc * corr[:, None], input_precision=DOT_PRECISION)
    if HAS_VAR and not STACKED:
        sink = (group[None, :] == 1) | (group[None, :] == 2)
        image = group[None, :] == 3
        p_s = tl.where(sink, p, 0.0).to(v.dtype)
        acc_s = tl.dot(p_s, v, acc_s * corr[:, None], input_precision=DOT_PRECISION)
        p_u = tl.where(image, p, 0.0).to(v.dtype)
        acc_u = tl.dot(p_u, v, acc_u * corr[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc, l_t, l_sv, l_u, acc_s, acc_u


@triton.jit
def _n_image(NImage, group_ptrs, b, NG, HAS_N_IMAGE: tl.constexpr, BLOCK: tl.constexpr):
    """VAR's epsilon count: n_image[b] if given, else the row's columns of groups 2 and 3
    among its NG col_group columns."""
    if HAS_N_IMAGE:
        n = tl.load(NImage + b)
    else:
        count = tl.zeros([BLOCK], tl.float32)
        for start in range(0, NG, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            group = tl.load(group_ptrs + cols, mask=cols < NG, other=0)
            count += (group >= 2).to(tl.float32)
        n = tl.sum(count, 0)
    return n


@triton.jit
def _row_var_params(VarKeep, VarRho, VarSumm, b, keep, rho, summ, VAR_PER_ROW: tl.constexpr):
    """VAR's (keep, rho, summ) for batch row b: element b of VarKeep, VarRho, VarSumm [B], or
    the scalars."""
    if VAR_PER_ROW:
        keep = tl.load(VarKeep + b)
        rho = tl.load(VarRho + b)
        summ = tl.load(VarSumm + b)
    return keep, rho, summ


@triton.jit
def _var_factors(l_i, l_t, l_sv, l_u, var_row, n_img, keep, rho, summ):
    """VAR's per-row (f_sink, f_image) from the unnormalised group sums (var.md section 1.3)."""
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    a_t = l_t * inv
    a_sv = l_sv * inv
    a_u = l_u * inv
    a_v = a_sv + a_u
    sel = var_row & (a_v >= summ) & (a_sv / (a_v + n_img * 1e-6) <= rho) & (a_u > 0)
    f_s = tl.where(sel, keep, 1.0)
    f_u = tl.where(sel, 1.0 + (1.0 - keep) * (a_sv + a_t) / tl.where(sel, a_u, 1.0), 1.0)
    return f_s, f_u


@triton.jit
def _finish_rows(
    acc, acc_s, acc_u, m_i, l_i, l_t, l_sv, l_u,
    var_row, n_img, keep, rho, summ, head_scale,
    GroupMass, LastStats, mass_rows, last_heads, row_ok, is_last,
    HAS_VAR: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr,
    WANT_MASS: tl.constexpr, WANT_LAST: tl.constexpr,
):  # fmt: skip
    """Epilogue: VAR on the group partials, normalise, head scale; write side outputs.

    acc* [M, D]; m_i, l_* [M]. mass_rows [M]: row index into GroupMass [B*H*Q, 4];
    last_heads [M]: (b*H + h) into LastStats [B*H, 4] = (m, l, f_sink, f_image), written by
    rows with is_last. Returns the normalised output [M, D] in fp32.
    """
    f_s = tl.full(l_i.shape, 1.0, tl.float32)
    f_u = f_s
    if HAS_VAR:
        f_s, f_u = _var_factors(l_i, l_t, l_sv, l_u, var_row, n_img, keep, rho, summ)
        # O' = O + (f_s - 1) O_sink + (f_u - 1) O_image: exactly O for unselected rows.
        acc = acc + (f_s - 1.0)[:, None] * acc_s + (f_u - 1.0)[:, None] * acc_u
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    if HAS_HEAD_SCALE:
        out = out * head_scale[:, None]
    if WANT_MASS:
        base = GroupMass + mass_rows * 4
        tl.store(base + 0, (l_i - l_t - l_sv - l_u) * inv, mask=row_ok)
        tl.store(base + 1, l_t * inv, mask=row_ok)
        tl.store(base + 2, l_sv * inv, mask=row_ok)
        tl.store(base + 3, l_u * inv, mask=row_ok)
    if WANT_LAST:
        base = LastStats + last_heads * 4
        mask = row_ok & is_last
        tl.store(base + 0, m_i, mask=mask)
        tl.store(base + 1, l_i, mask=mask)
        tl.store(base + 2, f_s, mask=mask)
        tl.store(base + 3, f_u, mask=mask)
    return out


@triton.jit
def _last_row_kernel(
    LastRow, LastStats, KeyStart, KeyEnd, end_stride, ColGroup, H, NK, NG,
    BLOCK_N: tl.constexpr, HAS_VAR: tl.constexpr, HAS_END: tl.constexpr,
):  # fmt: skip
    """In place: the last query row's edited log2 scores (stored by the attention kernel) become
    its final probabilities, from the row's running max and sum (m, l) and VAR factors.
    Columns left of key_start (and from the row's KeyEnd on) were never written and become 0.
    Grid (B*H, key tiles)."""
    bh = tl.program_id(0)
    b = bh // H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NK
    ptrs = LastRow + bh.to(tl.int64) * NK + cols
    visible = (cols >= tl.load(KeyStart + b)) & col_ok
    if HAS_END:
        visible = visible & (cols < tl.load(KeyEnd + b * end_stride))
    s = tl.load(ptrs, mask=visible, other=float("-inf"))
    m = tl.load(LastStats + bh * 4 + 0)
    l_i = tl.load(LastStats + bh * 4 + 1)
    p = tl.exp2(s - m) * tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    if HAS_VAR:
        group = tl.load(ColGroup + b.to(tl.int64) * NG + cols, mask=col_ok & (cols < NG), other=0)
        f_s = tl.load(LastStats + bh * 4 + 2)
        f_u = tl.load(LastStats + bh * 4 + 3)
        p = p * tl.where((group == 1) | (group == 2), f_s, tl.where(group == 3, f_u, 1.0))
    tl.store(ptrs, p, mask=col_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel (a fixed heuristic, never keyed on K)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2  # decode only: how finely the keys are split


def check_launch(
    q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, scale: float, edits, validate: bool = True,
    key_end: Tensor | None = None,
) -> None:  # fmt: skip
    """Shapes, dtypes and devices (unless validate=False); the kernels also need a power-of-two
    head dim, which is always checked (it is cheap and the kernels cannot run without it)."""
    B, H, Q, D = q.shape
    if validate:
        check_inputs(q, k, v, key_start, scale, key_end)
        check_edits(edits, B, H, Q, k.shape[2], q.device)
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim in [16, 256], got {D}")


def end_stride(key_end: Tensor | None) -> int:
    """0: one key_end [1] for every row; 1: key_end [B], one per row."""
    return 0 if key_end is None or key_end.numel() == 1 else 1


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def edit_tensors(edits: AttentionEdits, dummy: Tensor) -> dict[str, Tensor]:
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


def var_args(edits: AttentionEdits, B: int, dummy: Tensor) -> dict[str, object]:
    """VAR's parameters as the kernels take them: the three floats as scalars (nothing to build
    or copy per call), or, when any is per row, VarKeep, VarRho, VarSumm float32 [B] read by
    batch row (the per-row tensors themselves: nothing is copied)."""
    per_row = edits.var_on and edits.var_per_row
    keep, rho, summ = 1.0, 0.0, 0.0  # unread unless VAR runs on floats
    if edits.var_on and not per_row:
        keep, rho, summ = float(edits.var_keep), float(edits.var_rho), float(edits.var_summ)
    columns = var_columns(edits, B, dummy.device) if per_row else (dummy,) * 3
    return {
        "VarKeep": columns[0], "VarRho": columns[1], "VarSumm": columns[2],
        "keep": keep, "rho": rho, "summ": summ, "VAR_PER_ROW": per_row,
    }  # fmt: skip


def group_width(edits: AttentionEdits) -> int:
    """NG: the col_group width the kernels read (columns past it are group 0); 0 without it."""
    return 0 if edits.col_group is None else edits.col_group.shape[1]


def edit_flags(q: Tensor, edits: AttentionEdits) -> dict[str, object]:
    return {
        "HAS_PAI": edits.pai_on,
        "NEED_GROUPS": edits.needs_groups,
        "HAS_VAR": edits.var_on,
        "WANT_LAST": edits.want_last_row,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def epilogue_flags(edits: AttentionEdits) -> dict[str, object]:
    return {
        "HAS_HEAD_SCALE": edits.head_scale is not None,
        "WANT_MASS": edits.want_group_mass,
        "HAS_N_IMAGE": edits.n_image is not None,
    }


def allocate_outputs(q: Tensor, K: int, edits: AttentionEdits, dummy: Tensor) -> dict[str, Tensor]:
    """out [B, Q, H, D] and the requested statistics' buffers; unrequested ones are `dummy`
    (any tensor on the device: the kernels never touch a buffer they were not asked for)."""
    B, H, Q, D = q.shape
    f32 = {"dtype": torch.float32, "device": q.device}
    return {
        "out": torch.empty(B, Q, H, D, dtype=q.dtype, device=q.device),
        "GroupMass": torch.empty(B, H, Q, 4, **f32) if edits.want_group_mass else dummy,
        # per head (m, l, f_sink, f_image) of the last row, and its log2 scores then probabilities
        "LastStats": torch.empty(B * H * 4, **f32) if edits.want_last_row else dummy,
        "LastRow": torch.empty(B, H, K, **f32) if edits.want_last_row else dummy,
    }


def finish_stats(
    res: dict[str, Tensor], key_start: Tensor, edits: AttentionEdits, key_end: Tensor | None = None
):
    """Turn the last row's stored scores into probabilities; collect the statistics dict."""
    stats = {}
    if edits.want_group_mass:
        stats["group_mass"] = res["GroupMass"]
    if edits.want_last_row:
        B, H, K = res["LastRow"].shape
        block_n = 256 if key_start.is_cuda else 16
        col_group = key_start if edits.col_group is None else edits.col_group.contiguous()
        _last_row_kernel[(B * H, triton.cdiv(K, block_n))](
            res["LastRow"], res["LastStats"], key_start,
            key_start if key_end is None else key_end, end_stride(key_end), col_group, H, K,
            group_width(edits),
            BLOCK_N=block_n, HAS_VAR=edits.var_on, HAS_END=key_end is not None,
        )  # fmt: skip
        stats["last_row"] = res["LastRow"]
    return stats
