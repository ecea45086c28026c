"""LLaVA-NeXT (anyres) after a pruning vision tower: restore the grid, map the packed sequence.

A vision stage that prunes every crop (the base image and each sub-crop are separate "images"
in the tower) hands the projector fewer tokens than LLaVA-NeXT's packing expects: transformers'
`pack_image_features` reshapes each crop's tokens into a full patch grid, stitches the sub-crops
into one raster, removes the rows/columns of resize padding ("unpad") and appends an
`image_newline` after each raster row; the prompt holds one placeholder per packed token.

So that transformers' projector and packing run unmodified (no copy of them here), the core:
1. scatters each crop's survivors back into its full grid (zeros elsewhere) before the projector;
2. learns where each (crop, patch) lands in the packed sequence by running the model's own
   `pack_image_features` on token ids instead of features (newline = -1);
3. drops every placeholder column that holds no survivor (and, unless kept, every newline)
   before LLM layer 0, so the LLM never sees them.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

NEWLINE = -1.0  # the id a packed newline token carries


def restore_grid(features: torch.Tensor, grid_ids: torch.Tensor, full: int) -> torch.Tensor:
    """features [N, W, C] of each crop's survivors at grid positions grid_ids [N, W] ->
    [N, full, C] with zeros at the pruned positions."""
    n_crops, _, channels = features.shape
    grid = features.new_zeros(n_crops, full, channels)
    return grid.scatter_(1, grid_ids[..., None].expand(-1, -1, channels), features)


def crops_per_image(packer: torch.nn.Module, image_sizes: torch.Tensor) -> list[int]:
    """How many crops (base + sub-crops) the tower saw per image, as transformers counts them."""
    pinpoints, side = packer.config.image_grid_pinpoints, packer.config.vision_config.image_size
    return [image_size_to_num_patches(size, pinpoints, side) for size in image_sizes]


def packed_ids(
    packer: torch.nn.Module, image_sizes: torch.Tensor, full: int, strategy: str
) -> torch.Tensor:
    """Id of the token at each packed position, all images in order: float64 [P].

    Id = crop * full + grid position (crops numbered across all images), NEWLINE for newlines.
    float64 holds these integers exactly.
    """
    crops = crops_per_image(packer, image_sizes)
    device = image_sizes.device
    ids = torch.arange(sum(crops) * full, dtype=torch.float64, device=device)
    per_image = list(ids.view(-1, full, 1).split(crops))  # [crops_i, full, 1] each
    newline = torch.full((1,), NEWLINE, dtype=torch.float64, device=device)
    packed, _ = packer.pack_image_features(per_image, image_sizes, strategy, image_newline=newline)
    return torch.cat(packed)[:, 0]


def keep_columns(
    ids: torch.Tensor, alive: torch.Tensor, image_mask: torch.Tensor, keep_newlines: bool
) -> torch.Tensor:
    """keep bool [R, S] over the prompt columns: text, plus the placeholders whose packed token
    survived (alive bool [N, full] over every crop's grid), plus newlines if `keep_newlines`.

    transformers fills the placeholders in row-major order with the packed tokens in image
    order, so the k-th placeholder of the batch holds packed token k.
    """
    if ids.numel() != int(image_mask.sum()):
        raise ValueError(
            f"the prompt holds {int(image_mask.sum())} image placeholders but the packed "
            f"images have {ids.numel()} tokens"
        )
    newline = ids == NEWLINE
    token = alive.flatten()[ids.clamp(min=0).long()]
    kept = torch.where(newline, keep_newlines, token)
    keep = ~image_mask
    keep[image_mask] = kept
    return keep
