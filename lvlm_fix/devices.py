"""Moving a forward's per-row tensors to the device of a split model's layer (see
`hooks.ForwardContextOn`, `RowState.on`): one function, so tests can make every move a real copy
on a CPU, and one cache of the copies."""

from __future__ import annotations

from typing import Any

import torch


def moved(x: Any, device: torch.device) -> Any:
    """`x` (a tensor, or an object with `.to`, e.g. an ImageLayout) on `device`: itself if it is
    there, else a copy (device to device: no host sync)."""
    return x.to(device, non_blocking=True)


class DeviceCopies:
    """Copies of tensors on other devices, one per (name, device), kept while the source is the
    same object. A source changed in place needs `forget`; `put` registers a copy its owner
    keeps in step itself."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, torch.device], tuple[Any, Any]] = {}

    def get(self, name: str, source: Any, device: torch.device) -> Any:
        """`source` (a tensor or an ImageLayout; None stays None) on `device`."""
        if source is None:
            return None
        held = self._held.get((name, device))
        if held is None or held[0] is not source:
            held = (source, moved(source, device))
            self._held[(name, device)] = held
        return held[1]

    def put(self, name: str, source: Any, device: torch.device, copy: Any) -> None:
        """Register `copy` as `source` on `device` (its owner keeps both in step)."""
        self._held[(name, device)] = (source, copy)

    def forget(self, name: str) -> None:
        """Drop every copy of `name` (its source changed in place)."""
        for key in [key for key in self._held if key[0] == name]:
            del self._held[key]
