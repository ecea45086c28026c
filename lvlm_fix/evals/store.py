"""predictions.jsonl: append-only, one JSON object per (method row, sample), crash tolerant.

A run killed while writing leaves at most one partial last line; opening the store cuts it off
so that appended lines stay valid JSONL. Lines are never rewritten, which is what makes a
resumed run keep the finished samples byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class PredictionStore:
    """The lines of predictions.jsonl, indexed by (method, key)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        valid = 0  # byte length of the complete, parseable prefix
        for chunk in raw.splitlines(keepends=True):
            try:
                if not chunk.endswith(b"\n"):
                    raise ValueError("partial last line")
                line = json.loads(chunk)
            except ValueError:
                break
            self.lines[(line["method"], line["key"])] = line
            valid += len(chunk)
        if valid < len(raw):
            with self.path.open("r+b") as handle:
                handle.truncate(valid)

    def has(self, method: str, key: str) -> bool:
        return (method, key) in self.lines

    def for_method(self, method: str) -> list[dict[str, Any]]:
        return [line for (name, _), line in self.lines.items() if name == method]

    def append(self, lines: Iterable[dict[str, Any]]) -> None:
        lines = list(lines)
        with self.path.open("a", encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            handle.flush()
        for line in lines:
            self.lines[(line["method"], line["key"])] = line
