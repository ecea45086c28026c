"""Mechanics of token pruning shared by every pruning method (the core applies them, not methods).

LLM side: a prune hook returns, at the input of decoder layer l, which of the current columns
to keep. Rows may keep different counts, so each row's kept columns are packed to the right and
filler columns fill the left, exactly like left padding: `key_start` stays "first real column"
for the masks and kernels. Kept columns keep their ORIGINAL position ids (gaps), unless the cut
renumbers (FlowCut's reference behaviour): then layers >= l number their kept prompt columns
0, 1, ... and generated tokens continue from that count. Layers >= l cache only the kept
columns; each layer builds its own mask from its own columns. The anyres vision stage's drop
(`lvlm_fix.anyres`) is such a cut at layer 0.

Vision side: a vision hook returns, after an encoder layer, which tokens of each image to keep;
images may keep different counts, so they are packed left and padded on the right (the encoder
is bidirectional) with a key-padding mask for the later layers.
"""

from __future__ import annotations

import torch


def pack_kept(
    keep: torch.Tensor, left: bool, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """keep bool [R, W] -> (order long [R, W'], slot bool [R, W']) with W' = max kept count.

    order[r, j] is the source column of slot j (kept columns in their original order);
    slot marks real slots. Fillers go left (`left=True`) or right; their order entry is junk.
    Pass `width` (= the max kept count) when the caller already has it: W' is data dependent,
    so finding it here costs a host-device sync.
    """
    lengths = keep.sum(-1)
    width = int(lengths.max()) if width is None else width
    steps = torch.arange(width, device=keep.device)[None]
    # A stable sort of 0/1 keys keeps each group in original order: ascending puts the kept
    # columns last (left fillers), descending puts them first (right fillers).
    ranked = torch.sort(keep.to(torch.uint8), dim=-1, descending=not left, stable=True).indices
    if left:
        return ranked[:, -width:], steps >= (width - lengths)[:, None]
    return ranked[:, :width], steps < lengths[:, None]


def layer_mask(
    cols: torch.Tensor,
    key_start: torch.Tensor,
    q_len: int,
    k_len: int,
    incoming: torch.Tensor | None,
    loop_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Mask [R, 1, Q, K] of one pruned layer from its own prompt columns cols [R, W].

    Keys: the W prompt columns (real iff col >= the prompt's key_start), then K - W generated
    columns, whose visibility (OPERA's holes) comes from the last K - W columns of the decode
    loop's 2-D mask `loop_mask` [R, S + generated] (transformers' own mask is sized by layer 0's
    cache, which a layer-0 cut shortens). Causal by cache index, which is causal in original
    order because kept columns stay sorted. A query always sees itself, so filler rows stay
    finite. Bool (True = attend), or additive in the dtype of `incoming` (transformers' mask)
    when that is a float mask.
    """
    rows, width = cols.shape
    device = cols.device
    real = torch.ones(rows, k_len, dtype=torch.bool, device=device)
    real[:, :width] = cols >= key_start[:, None]
    keys = torch.arange(k_len, device=device)[None]
    query_cols = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    causal = keys <= query_cols  # [Q, K]
    mask = (causal[None] & (real[:, None] | (keys == query_cols)[None]))[:, None]  # [R,1,Q,K]
    generated = k_len - width
    if generated > 0:
        if loop_mask is None:
            raise ValueError("a pruned layer with generated columns needs the loop's 2-D mask")
        mask[..., width:] &= loop_mask[:, None, None, -generated:].bool()
    if incoming is not None and incoming.is_floating_point():
        return torch.zeros(mask.shape, dtype=incoming.dtype, device=device).masked_fill(
            ~mask, torch.finfo(incoming.dtype).min
        )
    return mask


def gather_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [R, W, ...] -> x [R, W', ...] at columns order [R, W'] (broadcasts a size-1 row dim)."""
    if x.shape[0] != order.shape[0]:
        x = x.expand(order.shape[0], *x.shape[1:])
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)
