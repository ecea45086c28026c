"""VAR's sink test of every prompt token in one launch (the CUDA path of `methods.var`).

A token is a sink at a layer when phi(x) = max_{d in dims} |x_d| / RMS(x) > tau, x its residual
stream entering the layer, in fp32 with the bare RMS sqrt(mean(x^2) + 1e-6). In plain torch that
is a dozen ops a layer over [R, S, D] (to fp32, square, mean, root, abs, divide, gather, max,
compare, mask), each a launch whose host time adds up over a prefill's layers; here it is one.
The sum of squares is reduced in another order than torch's, so phi can differ from the torch
test in its last bits: a token exactly at tau could flip, no other.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

RMS_EPS = 1e-6  # VAR's bare RMS (specs/var.md), not the model's norm epsilon


@triton.jit
def _sink_kernel(
    Hidden, Dims, Filled, Out, S, D, n_dims, stride_hr, stride_hs, tau, eps,
    BLOCK_D: tl.constexpr, BLOCK_DIMS: tl.constexpr,
):  # fmt: skip
    """Grid (R * S,): token s of row r. Out[r, s] = phi > tau and the token is not padding."""
    token = tl.program_id(0)
    r = token // S
    s = token % S
    row = Hidden + r.to(tl.int64) * stride_hr + s.to(tl.int64) * stride_hs
    squares = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(row + cols, mask=cols < D, other=0.0).to(tl.float32)
        squares += x * x
    rms = tl.sqrt(tl.sum(squares, 0) / D + eps)
    which = tl.arange(0, BLOCK_DIMS)
    dims = tl.load(Dims + which, mask=which < n_dims, other=0)
    peak = tl.max(tl.abs(tl.load(row + dims, mask=which < n_dims, other=0.0).to(tl.float32)), 0)
    filled = tl.load(Filled + token) != 0
    tl.store(Out + token, ((peak / rms > tau) & filled).to(tl.int8))


def sink_tokens(hidden: Tensor, dims: Tensor, tau: float, filled: Tensor) -> Tensor:
    """bool [R, S]: hidden [R, S, D] (last dim contiguous), dims int32 [n] on its device,
    filled bool [R, S] (False = padding, never a sink)."""
    R, S, D = hidden.shape
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    out = torch.empty(R, S, dtype=torch.bool, device=hidden.device)
    if R * S == 0:
        return out
    # Triton launches on the current device: a split model's layer may be on another GPU.
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _sink_kernel[(R * S,)](
            hidden, dims, filled.contiguous().view(torch.uint8), out.view(torch.int8), S, D,
            dims.numel(), hidden.stride(0), hidden.stride(1), float(tau), RMS_EPS,
            BLOCK_D=min(1024, triton.next_power_of_2(D)),
            BLOCK_DIMS=max(2, triton.next_power_of_2(dims.numel())),
        )  # fmt: skip
    return out
