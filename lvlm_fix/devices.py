"""Moving a forward's per-row tensors to the device of a split model's layer (see
`hooks.ForwardContextOn`): one function, so tests can make every move a real copy on a CPU."""

from __future__ import annotations

from typing import Any

import torch


def moved(x: Any, device: torch.device) -> Any:
    """`x` (a tensor, or an object with `.to`, e.g. an ImageLayout) on `device`: itself if it is
    there, else a copy (device to device: no host sync)."""
    return x.to(device, non_blocking=True)
