"""The per-layer attention edits one kernel call applies, and the checks on their shapes.

Shapes: B batch rows, H query heads, Q query rows, K key columns. Every field at its default
(None / False / 1.0) means "off", and a call with every edit off is plain causal attention.
VAR's three parameters are each a float (every batch row) or a float32 [B] tensor (one value
per row), so one call can serve rows of requests with different VAR settings.

A change the built-in fields cannot express is a modifier: a small function on the rows, heads
and columns it chooses, in the shape of FlexAttention's `score_mod`. Modifiers run on the
plain-torch path (reference.py), which materialises the probabilities; the fused Triton kernels
cover the built-in fields only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

# col_group values. Image columns are {VISUAL_SINK, IMAGE}; VAR taxes {TEXT_SINK, VISUAL_SINK}.
REST, TEXT_SINK, VISUAL_SINK, IMAGE = 0, 1, 2, 3
N_GROUPS = 4


class Modifier(Protocol):
    """A change to attention scores (before the softmax) or probabilities (after it and VAR).

    x is fp32 [B, H, Q, K]; b [B, 1, 1, 1], h [1, H, 1, 1], q_idx [B or 1, 1, Q, 1] (the key
    column each query row sits at) and kv_idx [1, 1, 1, K] are index tensors that broadcast
    against it, as FlexAttention's score_mod(score, b, h, q_idx, kv_idx) receives them, so a
    modifier picks its rows, heads and columns by indexing its own tensors (`self.gain[b, h]`).
    Returns the new x (broadcastable to it). Scores of columns a query row cannot see are
    masked after every score modifier; such probabilities are 0 on entry and zeroed again after
    every probability modifier. Modifiers are frozen dataclasses (plain data, no closures).
    """

    def __call__(
        self, x: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor: ...


@dataclass(frozen=True)
class AttentionEdits:
    """Per-layer edits for one attention call. Every field None/False = off.

    B batch rows, H query heads, Q query rows, K key columns.
    """

    col_group: Tensor | None = None
    """int8 [B, G], G <= K: 0 rest, 1 text sink, 2 visual sink, 3 non-sink image (image = {2, 3}).
    Columns G.. are group 0, so a prompt-wide map serves every decode step without padding."""
    image_gain: Tensor | None = None
    """float32 [B, H]: PAI alpha (0 = off). Image scores s of gain_rows become s + alpha*|s|."""
    gain_rows: Tensor | None = None
    """bool [B, Q]: query rows PAI applies to. Required with image_gain."""
    var_rows: Tensor | None = None
    """bool [B, Q]: query rows eligible for VAR redistribution (None or all False = VAR off)."""
    var_keep: float | Tensor = 1.0
    """float or float32 [B]: p_code, the fraction of sink mass kept (a float 1.0 = identity, VAR
    is skipped; a row that wants no VAR next to rows that do has var_rows all False)."""
    var_rho: float | Tensor = 0.5
    """float or float32 [B]: rho_code; a row is selected only if
    A_Sv / (A_V + n_image*1e-6) <= var_rho."""
    var_summ: float | Tensor = 0.2
    """float or float32 [B]: ... and A_V >= var_summ."""
    n_image: Tensor | None = None
    """float32 [B]: image columns per row, for the epsilon term (None = count col_group >= 2)."""
    head_scale: Tensor | None = None
    """float32 [B, H]: VHR output scale per head (1 = identity), an epilogue multiply."""
    score_mods: tuple[Modifier, ...] = ()
    """Modifiers of the scores (after PAI, before masking and the softmax): plain-torch path."""
    prob_mods: tuple[Modifier, ...] = ()
    """Modifiers of the probabilities (after VAR, before P @ V): plain-torch path."""
    want_group_mass: bool = False
    """Return group masses [B, H, Q, 4] (after PAI, before VAR; fp32)."""
    want_last_row: bool = False
    """Return the last query row's final probabilities [B, H, K] (after all edits; fp32)."""

    @property
    def pai_on(self) -> bool:
        return self.image_gain is not None

    @property
    def var_on(self) -> bool:
        # keep == 1 scales sinks by 1 and images by 1 + 0*x: exactly the identity, so skip it.
        # A per-row keep is not read (that would sync with the device): VAR runs.
        if self.var_rows is None:
            return False
        return isinstance(self.var_keep, Tensor) or self.var_keep != 1.0

    @property
    def var_per_row(self) -> bool:
        """Whether any of VAR's parameters is a per-row tensor (else all are floats)."""
        return any(isinstance(v, Tensor) for v in (self.var_keep, self.var_rho, self.var_summ))

    @property
    def fused(self) -> bool:
        """Whether the fused kernels cover these edits (no modifiers)."""
        return not (self.score_mods or self.prob_mods)

    @property
    def needs_groups(self) -> bool:
        return self.var_on or self.want_group_mass


def full_col_group(col_group: Tensor, K: int) -> Tensor:
    """int8 [B, K]: col_group [B, G] with columns G.. filled with group 0 (REST)."""
    extra = K - col_group.shape[1]
    return torch.nn.functional.pad(col_group, (0, extra), value=REST) if extra else col_group


def var_columns(edits: AttentionEdits, B: int, device: torch.device) -> tuple[Tensor, ...]:
    """VAR's (keep, rho, summ), each float32 [B]: a per-row tensor as it is (the engine's decode
    tables: nothing is built per layer), a float repeated over the rows."""

    def column(value: float | Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value
        return torch.full((B,), value, dtype=torch.float32, device=device)

    return column(edits.var_keep), column(edits.var_rho), column(edits.var_summ)


def resolved_n_image(edits: AttentionEdits) -> Tensor:
    """float32 [B]: n_image as given, or the count of image columns (groups 2 and 3) per row."""
    if edits.n_image is not None:
        return edits.n_image
    assert edits.col_group is not None
    return (edits.col_group >= VISUAL_SINK).sum(-1, dtype=torch.float32)


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, scale: float, key_end: Tensor | None = None
) -> None:
    """Shapes and dtypes of q [B, H, Q, D], k/v [B, Hkv, K, D], key_start [B], key_end [B] or
    [1] (contiguous)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {_describe(t)}")
    B, H, Q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v must be [B={B}, Hkv, K, D={D}], got {tuple(k.shape)}")
    Hkv, K = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if Q > K:
        raise ValueError(f"query rows sit at the end of the keys, so Q={Q} must be <= K={K}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise TypeError(
            f"q, k, v must share one dtype among float16/bfloat16/float32, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device == key_start.device):
        raise ValueError("q, k, v and key_start must be on one device")
    if key_start.shape != (B,) or key_start.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_start must be int32/int64 [B={B}], got {_describe(key_start)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if key_end is not None:
        shape_ok = key_end.shape in ((1,), (B,)) and key_end.is_contiguous()
        if not shape_ok or key_end.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"key_end must be int32/int64 [B={B}] or [1], got {_describe(key_end)}"
            )
        if key_end.device != q.device:
            raise ValueError(f"key_end is on {key_end.device}, attention runs on {q.device}")


def check_edits(
    edits: AttentionEdits, B: int, H: int, Q: int, K: int, device: torch.device
) -> None:
    """Shapes, dtypes and devices of every set field (values are not read: no host sync)."""
    if not isinstance(edits, AttentionEdits):
        raise TypeError(f"edits must be AttentionEdits, got {type(edits).__name__}")
    # col_group may be narrower than the keys (the columns past it are group 0), never wider.
    groups = edits.col_group
    width = groups.shape[-1] if isinstance(groups, Tensor) and groups.dim() == 2 else K
    if not 0 < width <= K:
        raise ValueError(f"edits.col_group must be int8 [B={B}, G] with 0 < G <= K={K}, "
                         f"got {_describe(groups)}")  # fmt: skip
    expected = {
        "col_group": ((B, width), torch.int8),
        "image_gain": ((B, H), torch.float32),
        "gain_rows": ((B, Q), torch.bool),
        "var_rows": ((B, Q), torch.bool),
        "n_image": ((B,), torch.float32),
        "head_scale": ((B, H), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        if getattr(edits, name) is not None:
            _check_tensor(edits, name, shape, dtype, device)
    if (edits.image_gain is None) != (edits.gain_rows is None):
        raise ValueError("edits.image_gain and edits.gain_rows must be given together (PAI)")
    needs_cols = edits.pai_on or edits.var_rows is not None or edits.want_group_mass
    if needs_cols and edits.col_group is None:
        raise ValueError("PAI, VAR and want_group_mass need edits.col_group")
    for name in ("score_mods", "prob_mods"):
        mods = getattr(edits, name)
        if not isinstance(mods, tuple) or not all(callable(mod) for mod in mods):
            raise ValueError(f"edits.{name} must be a tuple of modifiers, got {mods!r}")
    for name in ("var_keep", "var_rho", "var_summ"):
        value = getattr(edits, name)
        if isinstance(value, Tensor):  # per row: the values stay on the device, unchecked
            _check_tensor(edits, name, (B,), torch.float32, device)
        elif name == "var_keep" and not 0.0 <= value <= 1.0:
            raise ValueError(f"edits.var_keep is a kept fraction in [0, 1], got {value}")
        elif not 0.0 <= value < float("inf"):
            raise ValueError(f"edits.{name} must be finite and >= 0, got {value}")


def _check_tensor(
    edits: AttentionEdits, name: str, shape: tuple, dtype: torch.dtype, device: torch.device
) -> None:
    t = getattr(edits, name)
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"edits.{name} must be {dtype} {list(shape)}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"edits.{name} is on {t.device}, attention runs on {device}")


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__
