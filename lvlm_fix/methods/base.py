"""The intervention contract: a pydantic config that contributes hooks to a request's Plan.

A method file declares a config class (frozen, extra="forbid", every field documented with its
neutral value), registers it under a short name, and implements `contribute(model)`. It returns a
`Contribution`: the hook points it uses, as plain data: frozen dataclasses (with `__call__` where
a function is wanted), never lambdas or closures, because a Plan is pickled across processes and
compared by value. A method never drives the decode loop, never keeps state on modules or on its
hooks (per-request tensors live in `RowState`), and never registers torch hooks itself.

Hook points (see ARCHITECTURE.md):
- views:      extra batch rows (another image, or none) and their logit weights per step
- attention:  per-layer edits inside attention, and a look at its output (`AttentionHook`)
- layer_input: the residual stream entering a decoder layer (`LayerInputHook`)
- search:     the token-selection strategy (`Search`, e.g. OPERA)
- prune:      token pruning inside the LLM (`PruneHook`: FastV, DyVTE)
- vision:     token pruning inside the vision tower (`VisionHook`: FlowCut)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lvlm_fix import devices

if TYPE_CHECKING:
    from lvlm_fix.hooks import AttentionHook, LayerInputHook, PruneHook, VisionHook
    from lvlm_fix.model import ModelInfo
    from lvlm_fix.search import Search

HookPoint = Literal["views", "attention", "layer_input", "search", "vision", "prune"]


# How a text-only row (PAI-CFG's and M3ID's view, VHR's counterfactual) is built, one switch
# shared by the three configs. "drop_image_tokens": the full prompt's ids minus the image tokens,
# the template text around them kept, as the reference code does (PAI's CFG.py and RITUAL's M3ID
# drop the image placeholder; VHR's official code takes the image span's indices to slice out).
# "rerender": the chat template rendered without image slots (it may differ, e.g. by the newline
# after `<image>`). A third way, keeping the image tokens and masking their columns (VHR's "mask",
# positions kept), is not offered: the fused attention kernel knows each row's first real column,
# not arbitrary hidden ones, so image columns would leak into every edited layer.
TextOnlyRow = Literal["drop_image_tokens", "rerender"]
TextOnly = Annotated[
    TextOnlyRow,
    Field(
        default="drop_image_tokens",
        description="Text-only row: the prompt's ids minus the image tokens, or re-rendered.",
    ),
]


@dataclass(frozen=True)
class View:
    """An extra batch row per sample, with its own KV cache rows.

    weight(t) is this view's logit weight at generated step t. The original view (index 0) is
    implicit and weighs 1 + the sum of every contribution's `base_weight(t)`.

    Its functions are frozen dataclasses with `__call__` (or module-level functions), never
    lambdas or closures: the Plan is pickled across processes and compared by value.
    """

    name: str
    weight: Callable[[int], float]
    drop_image: bool = False  # text-only row (PAI-CFG, M3ID, VHR's counterfactual)
    text_only: TextOnlyRow = "drop_image_tokens"  # how a drop_image row is built (see TextOnly)
    # image_fn returns the new image and a description of what it did (recorded in the output)
    image_fn: Callable[[Image.Image, torch.Generator], tuple[Image.Image, str]] | None = None
    pixel_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    prefill_only: bool = False  # dropped after prefill (VHR's counterfactual pass)
    edited: bool = True  # attention edits apply to this view's rows (PAI-CFG's uncond: False)


@dataclass(frozen=True)
class ConstantWeight:
    """A logit weight that is the same at every step (`View.weight`, `Contribution.base_weight`)."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class Contribution:
    """What one intervention adds to a Plan. Empty fields mean "does not use that hook"."""

    views: tuple[View, ...] = ()
    base_weight: Callable[[int], float] | None = None
    plausibility_beta: float | None = None  # adaptive plausibility cut on the original view
    attention: AttentionHook | None = None
    layer_input: LayerInputHook | None = None
    search: Search | None = None
    vision: VisionHook | None = None  # vision-tower token pruning (one per plan)
    prune: PruneHook | None = None  # LLM token pruning at decoder-layer inputs
    conflicts: frozenset[str] = frozenset()  # names it cannot run with on this model (+ class's)
    # Its attention edits at decode are fixed once prefill is done (functions of the RowState,
    # not of the step) and its hooks look at nothing during decode steps, so the engine asks
    # for the edits once and decodes the request's rows in its shared batch (slots.py), whose
    # steps replay CUDA graphs. False: the request decodes in a lane of its own (OPERA's
    # per-step recorder).
    shared_decode: bool = True
    # Every decode step re-runs the whole sequence (prompt + tokens so far) as a prefill, without
    # the KV cache, so prune hooks choose again each step (FastV's per-step mode).
    recompute: bool = False


class Intervention(BaseModel):
    """Base class of every method config. Subclasses set `name`, `hooks` and `contribute`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]
    hooks: ClassVar[frozenset[HookPoint]]
    conflicts: ClassVar[frozenset[str]] = frozenset()  # names this method cannot run with

    def is_neutral(self) -> bool:
        """True when this config provably changes nothing (then it contributes nothing)."""
        return False

    def contribute(self, model: ModelInfo) -> Contribution:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-ready `{"name": ..., **params}`, the form the CLI, API and evals use."""
        return {"name": self.name, **self.model_dump(mode="json")}


def layer_range(name: str, start: int, end: int | None, num_layers: int) -> frozenset[int]:
    """Layers [start, end) of a model of `num_layers`: end None = the model's depth, end < 0
    counts from it (-1 = every layer but the last). A range that is empty or goes beyond the
    model is refused, naming the method."""
    end = num_layers if end is None else end
    end = end + num_layers if end < 0 else end
    if not start < end <= num_layers:
        raise ValueError(
            f"{name} layers [{start}, {end}) are empty or beyond the model's {num_layers} layers"
        )
    return frozenset(range(start, end))


REGISTRY: dict[str, type[Intervention]] = {}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make a method available by its `name`."""
    if cls.name in REGISTRY:
        raise ValueError(f"intervention name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def parse_intervention(spec: Intervention | dict[str, Any]) -> Intervention:
    """`{"name": "vhr", "alpha": 2}` -> VHR(alpha=2), with errors that name the problem."""
    if isinstance(spec, Intervention):
        return spec
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"an intervention must be an object with a 'name' field, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = REGISTRY.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown intervention {spec['name']!r}; available: {sorted(REGISTRY)}")
    try:
        return cls(**params)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"bad parameters for intervention {cls.name!r}: {problems}") from None


def config_hash(interventions: list[Intervention] | tuple[Intervention, ...]) -> str:
    """A stable short id of a set of interventions (order-independent)."""
    canonical = json.dumps(
        sorted((i.spec() for i in interventions), key=json.dumps), sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass
class RowState:
    """Per-request tensors with a leading row dimension, kept aligned through beams and views.

    Methods store what they learn at prefill here (sink masks, head scales, ...). The decode
    loop re-indexes every entry whenever rows are dropped, expanded or reordered.

    Entries live on the model's input device. A hook on a layer of a split model on another
    device sees `state.on(device)` (through `ForwardContextOn`): reads are copies there, cached
    until the entry changes through this object: `state[key] = value`, `write` (in place) or
    `index_rows`. So a hook changes an entry in place only with `write`, never through
    `state[key][...] = ...`, which would change a copy.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    copies: devices.DeviceCopies = field(
        default_factory=devices.DeviceCopies, repr=False, compare=False
    )  # entries on a split model's other devices

    @classmethod
    def start(cls, views: Sequence[View], n_samples: int, device) -> RowState:
        """The prefill rows' built-in entries: each sample's original view, then `views`.
        "row.view" (0 = original), "row.edited" (attention edits apply), "row.sample"."""
        per_sample = len(views) + 1
        view_of_row = torch.arange(per_sample, device=device).repeat(n_samples)
        edited = torch.tensor([True] + [v.edited for v in views], device=device)
        return cls(
            {
                "row.view": view_of_row,
                "row.edited": edited[view_of_row],
                "row.sample": torch.arange(n_samples, device=device).repeat_interleave(per_sample),
            }
        )

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value  # a new object: copies of the old one are not reused

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def write(self, key: str, index: Any, value: torch.Tensor) -> None:
        """`state[key][index] = value` in place, from any device (`index`: ints and slices)."""
        entry = self.tensors[key]
        entry[index] = (
            value if value.device == entry.device else value.to(entry.device, non_blocking=True)
        )
        self.copies.forget(key)

    def index_rows(self, rows: torch.Tensor) -> None:
        for key, value in self.tensors.items():
            self.tensors[key] = value.index_select(0, rows.to(value.device))

    def on(self, device: torch.device, home: torch.device) -> RowStateOn:
        """This state as seen from `device`; entries it sets are stored on `home`."""
        return RowStateOn(self, device, home)


class RowStateOn:
    """A RowState as a hook on another device sees it (see `RowState`)."""

    def __init__(self, state: RowState, device: torch.device, home: torch.device):
        self._state, self.device, self._home = state, device, home

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._state.copies.get(key, self._state.tensors[key], self.device)

    def get(self, key: str) -> torch.Tensor | None:
        return self[key] if key in self._state.tensors else None

    def __contains__(self, key: str) -> bool:
        return key in self._state.tensors

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        stored = devices.moved(value, self._home)
        self._state[key] = stored
        if stored is not value:  # what this device reads back is the value it set
            self._state.copies.put(key, stored, self.device, value)

    def write(self, key: str, index: Any, value: torch.Tensor) -> None:
        self._state.write(key, index, value)
