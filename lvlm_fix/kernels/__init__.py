"""Edited attention: one call applies PAI, VAR and VHR's head scale and returns statistics.

`edited_attention` runs the Triton kernels on CUDA and the plain-torch reference elsewhere, and
the plain-torch path wherever the edits hold modifiers (which the kernels do not cover). It
goes through the custom op `lvlm_fix::edited_attention` (defined when this module is imported;
nothing else happens at import) so that a decode step calling it can be captured and compiled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .edits import AttentionEdits, check_edits, check_inputs, var_columns

__all__ = ["AttentionEdits", "edited_attention"]


@torch.library.custom_op("lvlm_fix::edited_attention", mutates_args=())
def _edited_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_start: Tensor,
    key_end: Tensor | None,
    scale: float,
    col_group: Tensor | None,
    image_gain: Tensor | None,
    gain_rows: Tensor | None,
    var_rows: Tensor | None,
    var_keep: Tensor | None,
    var_rho: Tensor | None,
    var_summ: Tensor | None,
    n_image: Tensor | None,
    head_scale: Tensor | None,
    want_group_mass: bool,
    want_last_row: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, group_mass, last_row); a statistic not asked for comes back as an empty tensor.
    var_keep, var_rho, var_summ: float32 [B] per-row VAR parameters, None when VAR is off."""
    var = {}
    if var_keep is not None:
        var = {"var_keep": var_keep, "var_rho": var_rho, "var_summ": var_summ}
    edits = AttentionEdits(
        col_group=col_group, image_gain=image_gain, gain_rows=gain_rows, var_rows=var_rows,
        **var, n_image=n_image, head_scale=head_scale, want_group_mass=want_group_mass,
        want_last_row=want_last_row,
    )  # fmt: skip
    out, stats = _run(q, k, v, scale, key_start, key_end, edits, validate=False)  # checked
    empty = q.new_empty(0, dtype=torch.float32)
    return out, stats.get("group_mass", empty), stats.get("last_row", empty.clone())


@_edited_attention_op.register_fake
def _(q, k, v, key_start, key_end, scale, col_group, image_gain, gain_rows, var_rows,
      var_keep, var_rho, var_summ, n_image, head_scale, want_group_mass,
      want_last_row):  # fmt: skip
    B, H, Q, D = q.shape
    f32 = torch.float32
    out = q.new_empty(B, Q, H, D)
    mass = q.new_empty(B, H, Q, 4, dtype=f32) if want_group_mass else q.new_empty(0, dtype=f32)
    last = q.new_empty(B, H, k.shape[2], dtype=f32) if want_last_row else q.new_empty(0, dtype=f32)
    return out, mass, last


def _run(q, k, v, scale, key_start, key_end, edits, validate):  # fmt: skip
    if q.is_cuda:
        # Imported here: Triton is only needed (and only present on every platform) with CUDA.
        from .triton_attention import edited_attention_triton as impl

        if q.device.index != torch.cuda.current_device():
            # Triton launches on the current device: a split model's layer on another GPU.
            with torch.cuda.device(q.device):
                return impl(q, k, v, scale=scale, key_start=key_start, edits=edits,
                            key_end=key_end, validate=validate)  # fmt: skip
    else:
        impl = reference.edited_attention
    return impl(
        q, k, v, scale=scale, key_start=key_start, edits=edits, key_end=key_end, validate=validate
    )


def edited_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_start: Tensor, edits: AttentionEdits,
    key_end: Tensor | None = None, validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """q [B, H, Q, D], k/v [B, Hkv, K, D] -> out [B, Q, H, D] in q's dtype, and stats.

    Mask: causal with query row i at key column E - Q + i, left padding from key_start [B]
    (column j visible to row i iff key_start[b] <= j <= E - Q + i). E is K, or key_end[b]
    ([B], or [1] for every row) for a preallocated cache whose columns from there on are empty
    (the engine's decode steps).
    Stats holds the requested "group_mass" [B, H, Q, 4] and "last_row" [B, H, K] (fp32).
    edits.col_group [B, G] may be narrower than the keys (G <= K): columns G.. are group 0.

    validate=False skips the shape/dtype checks: for callers whose edits are built by code that
    already guarantees them (the attention function's hot decode loop). Outside torch.compile the
    kernels run directly; under it, through the custom op (same math, one graph node).
    """
    if validate:
        check_inputs(q, k, v, key_start, scale, key_end)
        check_edits(edits, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    if not edits.fused:  # modifiers: plain torch, on every device (and traceable as it is)
        return reference.edited_attention(
            q, k, v, scale=scale, key_start=key_start, edits=edits, key_end=key_end,
            validate=False,
        )  # fmt: skip
    if not torch.compiler.is_compiling():  # eager: the op's dispatch would only add host time
        return _run(q, k, v, scale, key_start, key_end, edits, validate=False)
    # Floats and per-row tensors alike go in as tensors [B]: the schema has no per-row float.
    var = var_columns(edits, q.shape[0], q.device) if edits.var_on else (None,) * 3
    out, mass, last = _edited_attention_op(
        q, k, v, key_start, key_end, float(scale), edits.col_group, edits.image_gain,
        edits.gain_rows, edits.var_rows, *var, edits.n_image, edits.head_scale,
        edits.want_group_mass, edits.want_last_row,
    )  # fmt: skip
    stats = {}
    if edits.want_group_mass:
        stats["group_mass"] = mass
    if edits.want_last_row:
        stats["last_row"] = last
    return out, stats
