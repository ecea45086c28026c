"""Plain-torch edited attention: the oracle the Triton kernels are tested against.

It materialises the [B, H, Q, K] probabilities in fp32 and applies the edits in the order the
kernels fuse them: scores -> PAI gain -> mask -> softmax -> group masses -> VAR -> P @ V -> head
scale. It is also the path of edits the kernels do not cover: score modifiers run after the PAI
gain, probability modifiers after VAR (see `edits.Modifier`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .edits import (
    IMAGE,
    N_GROUPS,
    TEXT_SINK,
    VISUAL_SINK,
    AttentionEdits,
    check_edits,
    check_inputs,
    full_col_group,
    resolved_n_image,
    var_columns,
)


def visibility(key_start: Tensor, Q: int, K: int, key_end: Tensor | None = None) -> Tensor:
    """bool [B, 1, Q, K]: column j is visible to query row i iff key_start[b] <= j <= E - Q + i,
    with E = key_end[b] (the filled columns of a preallocated cache; [1] for every row) or K."""
    cols = torch.arange(K, device=key_start.device)
    rows = torch.arange(Q, device=key_start.device)
    end = torch.full_like(key_start, K) if key_end is None else key_end.expand_as(key_start)
    causal = cols[None, None, :] <= (end[:, None] - Q + rows[None, :])[..., None]  # [B, Q, K]
    unpadded = cols[None, :] >= key_start[:, None]  # [B, K]
    return (causal & unpadded[:, None, :])[:, None]


def mod_indices(B: int, H: int, Q: int, K: int, key_end: Tensor | None, device) -> tuple:
    """(b, h, q_idx, kv_idx): the index tensors a modifier receives (see `edits.Modifier`)."""
    end = torch.full((1,), K, device=device) if key_end is None else key_end
    q_idx = end[:, None] - Q + torch.arange(Q, device=device)  # [B or 1, Q]
    return (
        torch.arange(B, device=device)[:, None, None, None],
        torch.arange(H, device=device)[None, :, None, None],
        q_idx[:, None, :, None],
        torch.arange(K, device=device)[None, None, None, :],
    )


def masked_softmax(s: Tensor, visible: Tensor) -> Tensor:
    """fp32 softmax over visible columns; a row with no visible column gets all zeros (no NaN)."""
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)  # finite for empty rows
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total, torch.zeros_like(e))


def pai_gain(s: Tensor, visible: Tensor, edits: AttentionEdits) -> Tensor:
    """s + alpha*|s| on visible image columns of gain rows; s [B, H, Q, K] already scaled."""
    assert edits.image_gain is not None and edits.gain_rows is not None
    assert edits.col_group is not None
    image = (edits.col_group >= VISUAL_SINK)[:, None, None, :]  # [B, 1, 1, K]
    rows = edits.gain_rows[:, None, :, None]  # [B, 1, Q, 1]
    alpha = edits.image_gain[:, :, None, None]  # [B, H, 1, 1]
    return torch.where(image & rows & visible, s + alpha * s.abs(), s)


def group_masses(p: Tensor, col_group: Tensor) -> Tensor:
    """fp32 [B, H, Q, 4]: probability mass of each column group (0 rest .. 3 non-sink image)."""
    onehot = torch.nn.functional.one_hot(col_group.long(), N_GROUPS).to(p.dtype)  # [B, K, 4]
    return torch.einsum("bhqk,bkg->bhqg", p, onehot)


def var_weights(mass: Tensor, edits: AttentionEdits) -> tuple[Tensor, Tensor]:
    """Per-row VAR factors (f_sink, f_image) [B, H, Q] from the pre-VAR group masses."""
    assert edits.var_rows is not None
    a_t, a_sv, a_u = mass[..., TEXT_SINK], mass[..., VISUAL_SINK], mass[..., IMAGE]
    a_v = a_sv + a_u
    n_image = resolved_n_image(edits)[:, None, None]  # [B, 1, 1]
    # Floats become fp32 per-row values too, so both forms compute as the kernels do (in fp32).
    columns = var_columns(edits, mass.shape[0], mass.device)
    keep, rho, summ = (c[:, None, None] for c in columns)  # [B, 1, 1] each
    sel = (
        edits.var_rows[:, None, :]
        & (a_v >= summ)
        & (a_sv / (a_v + n_image * 1e-6) <= rho)
        & (a_u > 0)  # nowhere to send the budget: leave the row unchanged
    )
    f_sink = torch.where(sel, keep, torch.ones_like(a_u))
    f_image = 1.0 + (1.0 - keep) * (a_sv + a_t) / torch.where(sel, a_u, torch.ones_like(a_u))
    return f_sink, torch.where(sel, f_image, torch.ones_like(a_u))


def apply_var(p: Tensor, mass: Tensor, edits: AttentionEdits) -> Tensor:
    """Scale sink columns by f_sink and non-sink image columns by f_image in selected rows."""
    assert edits.col_group is not None
    f_sink, f_image = var_weights(mass, edits)  # [B, H, Q]
    group = edits.col_group[:, None, None, :]  # [B, 1, 1, K]
    sink = (group == TEXT_SINK) | (group == VISUAL_SINK)
    w = torch.where(sink, f_sink[..., None], torch.where(group == IMAGE, f_image[..., None], 1.0))
    return p * w


def edited_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor, edits: AttentionEdits,
    key_end: Tensor | None = None, validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """q [B, H, Q, D], k/v [B, Hkv, K, D] -> out [B, Q, H, D] in q's dtype, and requested stats.

    Mask: causal with query row i at key column E - Q + i, and left padding from key_start [B];
    E = key_end when given ([B] or [1]: a preallocated cache whose columns >= E are empty), else K.
    Stats: "group_mass" [B, H, Q, 4] (after PAI and score modifiers, before VAR), "last_row"
    [B, H, K] (after all edits but the head scale), both fp32. edits.col_group [B, G] may be
    narrower than the keys: columns G.. are group 0. validate=False skips the shape checks
    (the caller made them).
    """
    B, H, Q, _ = q.shape
    K = k.shape[2]
    if validate:
        check_inputs(q, k, v, key_start, scale, key_end)
        check_edits(edits, B, H, Q, K, q.device)
    if edits.col_group is not None:  # from here on every column has its group
        edits = replace(edits, col_group=full_col_group(edits.col_group, K))
    group = H // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # [B, H, K, D]
    vf = v.float().repeat_interleave(group, dim=1)
    s = scale * (q.float() @ kf.transpose(-1, -2))  # [B, H, Q, K]
    visible = visibility(key_start, Q, K, key_end)
    if edits.pai_on:
        s = pai_gain(s, visible, edits)
    where = mod_indices(B, H, Q, K, key_end, q.device) if not edits.fused else ()
    for mod in edits.score_mods:
        s = mod(s, *where)
    p = masked_softmax(s, visible)  # [B, H, Q, K] fp32
    stats: dict[str, Tensor] = {}
    if edits.needs_groups:
        assert edits.col_group is not None
        mass = group_masses(p, edits.col_group)
        if edits.want_group_mass:
            stats["group_mass"] = mass
        if edits.var_on:
            p = apply_var(p, mass, edits)
    for mod in edits.prob_mods:
        p = torch.where(visible, mod(p, *where), 0.0)
    if edits.want_last_row:
        stats["last_row"] = p[:, :, -1, :].clone()  # columns >= key_end are 0
    out = p @ vf  # [B, H, Q, D]
    if edits.head_scale is not None:
        out = out * edits.head_scale[:, :, None, None]
    return out.transpose(1, 2).to(q.dtype).contiguous(), stats
