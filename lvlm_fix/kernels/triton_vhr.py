"""VHR's head choice at one prefill layer in one launch (the CUDA path of `methods.vhr`).

Per sample: the vision-aware head distance VHD_h = ||o_h(with image) - o_h(text only)||_2 of
each head's output at the last prompt position, the outlier filter (VHD and the text-only
norm both above their mean + unbiased std: VHD set to 0), the choice VHD > median (the lower
middle value, as torch.median), and the head scales of the sample's rows: alpha on chosen
heads of the rows VHR scales, 1 elsewhere. In plain torch that is some twenty small ops per
reinforced layer, each a launch whose host time adds up; here it is one. Sums are reduced in
another order than torch's, so a distance within rounding of its threshold could go the other
way; nothing else differs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _head_scale_kernel(
    Out, HasImage, Targets, Scale, stride_or, stride_oh, last, H, D, rows_per_sample, view,
    alpha, OUTLIER_FILTER: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B,): sample b, whose rows b * rows_per_sample + (0 = with image, view = text
    only, ...) hold out[row, last] [H, D]. Writes Scale [R, H] for the sample's rows."""
    b = tl.program_id(0)
    first = b * rows_per_sample
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    head_ok = heads < H
    ok = head_ok[:, None] & (cols < D)[None, :]
    at = heads[:, None] * stride_oh + cols[None, :] + last
    with_image = tl.load(Out + first.to(tl.int64) * stride_or + at, mask=ok, other=0.0)
    without = tl.load(Out + (first + view).to(tl.int64) * stride_or + at, mask=ok, other=0.0)
    with_image = with_image.to(tl.float32)
    without = without.to(tl.float32)
    diff = with_image - without
    vhd = tl.sqrt(tl.sum(diff * diff, 1))  # [BLOCK_H]
    if OUTLIER_FILTER:
        text_norm = tl.sqrt(tl.sum(without * without, 1))
        vhd_mean = tl.sum(tl.where(head_ok, vhd, 0.0), 0) / H
        vhd_dev = tl.where(head_ok, vhd - vhd_mean, 0.0)
        vhd_std = tl.sqrt(tl.sum(vhd_dev * vhd_dev, 0) / (H - 1))
        norm_mean = tl.sum(tl.where(head_ok, text_norm, 0.0), 0) / H
        norm_dev = tl.where(head_ok, text_norm - norm_mean, 0.0)
        norm_std = tl.sqrt(tl.sum(norm_dev * norm_dev, 0) / (H - 1))
        outlier = (vhd > vhd_mean + vhd_std) & (text_norm > norm_mean + norm_std)
        vhd = tl.where(outlier, 0.0, vhd)
    ascending = tl.sort(tl.where(head_ok, vhd, float("inf")), 0)
    median = tl.sum(tl.where(heads == (H - 1) // 2, ascending, 0.0), 0)
    chosen = (vhd > median) & (tl.load(HasImage + b) != 0)
    per_sample = tl.where(chosen, alpha, 1.0)
    for i in range(rows_per_sample):
        row = first + i
        scaled = tl.load(Targets + row) != 0
        tl.store(Scale + row * H + heads, tl.where(scaled, per_sample, 1.0), mask=head_ok)


def head_scales(out: Tensor, view: int, rows_per_sample: int, has_image: Tensor,
                targets: Tensor, alpha: float, outlier_filter: bool) -> Tensor:  # fmt: skip
    """float32 [R, H]: one layer's head scales. out [R, Q, H, D] is the layer's attention
    output, rows sample-major (`rows_per_sample` a sample, its with-image row first, its
    text-only row at `view`); has_image bool [B], targets bool [R] (rows VHR scales)."""
    R, Q, H, D = out.shape
    if out.stride(-1) != 1:
        out = out.contiguous()
    scale = torch.empty(R, H, dtype=torch.float32, device=out.device)
    # Triton launches on the current device: a split model's layer may be on another GPU.
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _head_scale_kernel[(R // rows_per_sample,)](
            out, has_image.contiguous().view(torch.uint8), targets.contiguous().view(torch.uint8),
            scale, out.stride(0), out.stride(2), (Q - 1) * out.stride(1), H, D,
            rows_per_sample, view, float(alpha),
            OUTLIER_FILTER=outlier_filter, BLOCK_H=max(2, triton.next_power_of_2(H)),
            BLOCK_D=triton.next_power_of_2(D),
        )  # fmt: skip
    return scale
