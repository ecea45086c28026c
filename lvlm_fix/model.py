"""Load a LLaVA-family checkpoint and turn (prompt, images) samples into padded model inputs.

One name table (`FAMILIES`) maps our component names to each family's classes and module paths,
so nothing else in the library needs to know how LLaVA, LLaVA-NeXT or LLaVA-OneVision nest their
modules. `ImageLayout` records, per batch row, which prompt columns hold image tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from lvlm_fix.tiny import OnevisionImageProcessor


@dataclass(frozen=True)
class Family:
    """How one LLaVA family is built: its classes and where its parts live (dotted paths)."""

    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    language_model: str = "model.language_model"
    decoder_layers: str = "model.language_model.layers"
    vision_tower: str = "model.vision_tower"
    vision_layers: str = "model.vision_tower.encoder.layers"
    rotary: str = "model.language_model.rotary_emb"  # recomputes positions after a renumbering cut
    projector: str = "model.multi_modal_projector"
    # The module whose `pack_image_features` lays out anyres crops (None: one crop per image).
    packer: str | None = None


FAMILIES: dict[str, Family] = {
    "llava": Family(LlavaForConditionalGeneration, LlavaProcessor),
    "llava_next": Family(LlavaNextForConditionalGeneration, LlavaNextProcessor, packer="model"),
    "llava_onevision": Family(LlavaOnevisionForConditionalGeneration, OnevisionImageProcessor),
}

DEFAULT_PROMPT = "USER: {images}{text} ASSISTANT:"


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a loaded model that interventions need to build their hooks."""

    family: str
    text_model_type: str  # "llama", "qwen2", ... (VAR's sink dimensions depend on it)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    image_token_id: int
    name: str
    path: str = ""  # the checkpoint directory it was loaded from ("" if unknown)
    image_size: int = 336  # the vision tower's input side in pixels (LLaVA-1.5: 336)
    # Where the user's words sit in a rendered prompt (`query_span`): a one-turn prompt's text
    # takes columns [last image column + 1 + query_gap, S - query_tail) of its S columns.
    query_gap: int = 0  # tokens between the last image slot and the text ("\n")
    query_tail: int = 0  # tokens after the text (the assistant's generation prompt)


@dataclass(frozen=True)
class ImageLayout:
    """Which prompt columns of each batch row are image tokens (after left padding).

    image_mask: bool [R, S] over the S prompt columns; key_start: long [R], the first
    non-padding column. Columns past S (generated tokens) are never image tokens.
    """

    image_mask: torch.Tensor
    key_start: torch.Tensor
    # Token pruning: per decoder layer, long [R, W_l] = the prompt column held by each of that
    # layer's first W_l cache columns (-1 = filler, left of the real ones). Empty or None for a
    # layer = it holds every prompt column (no pruning, the default).
    columns: tuple[torch.Tensor | None, ...] = ()
    # Layers >= renumber_from number their prompt columns 0, 1, ... (compact positions, as if
    # the dropped tokens never existed); below it, or when None, columns keep original positions.
    renumber_from: int | None = None

    # Derived tensors are computed once per layout (hooks read them at every layer; a layout
    # is never changed in place: a cut or a row selection makes a new one).
    @cached_property
    def n_image(self) -> torch.Tensor:
        """Image tokens per row: long [R]."""
        return self.image_mask.sum(-1)

    @cached_property
    def filled(self) -> torch.Tensor:
        """bool [R, S]: the prompt columns that are not left padding (from key_start on)."""
        columns = torch.arange(self.image_mask.shape[1], device=self.image_mask.device)
        return columns[None, :] >= self.key_start[:, None]

    @cached_property
    def after_image(self) -> torch.Tensor:
        """bool [R, S]: the prompt columns after each row's last image column (all of a row
        without image)."""
        columns = torch.arange(self.image_mask.shape[1], device=self.image_mask.device)
        last_image = torch.where(self.image_mask, columns, -1).amax(-1)  # [R], -1 without image
        return columns[None, :] > last_image[:, None]

    def index_rows(self, rows: torch.Tensor) -> ImageLayout:
        # Layers after one cut share one tensor; keep them sharing (one index op per cut,
        # and the pruned layers' masks stay shared too, see hooks._pruned_kwargs).
        picked: dict[int, torch.Tensor] = {}
        columns = tuple(
            None if c is None else picked.setdefault(id(c), c[rows]) for c in self.columns
        )
        return replace(
            self, image_mask=self.image_mask[rows], key_start=self.key_start[rows], columns=columns
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> ImageLayout:
        """This layout on `device` (itself if it is there; shared column tensors stay shared)."""
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return moved.setdefault(id(t), t.to(device, non_blocking=non_blocking))

        if self.key_start.device == device and all(
            c is None or c.device == device for c in (self.image_mask, *self.columns)
        ):
            return self
        return replace(
            self,
            image_mask=move(self.image_mask),
            key_start=move(self.key_start),
            columns=tuple(move(c) for c in self.columns),
        )

    def columns_at(self, layer: int) -> torch.Tensor | None:
        """Prompt column of each prompt cache column of `layer`: long [R, W] or None (all)."""
        return self.columns[layer] if layer < len(self.columns) else None

    def at_layer(self, layer: int) -> ImageLayout:
        """This layout as seen by `layer`'s keys: its own image mask [R, W] and key_start.

        Fillers and original padding sit on the left, so key_start stays "first real column".
        """
        cols = self.columns_at(layer)
        if cols is None:
            return replace(self, columns=()) if self.columns else self
        image = self.image_mask.gather(1, cols.clamp(min=0)) & (cols >= 0)
        return ImageLayout(image_mask=image, key_start=(cols < 0).sum(-1))

    def with_columns(
        self, layer: int, cols: torch.Tensor, num_layers: int, renumber: bool = False
    ) -> ImageLayout:
        """Layers `layer`.. now hold only prompt columns `cols` (long [R, W], -1 = filler).

        `renumber`: those layers (and, once set, every later cut) use compact positions.
        """
        columns = list(self.columns) + [None] * (num_layers - len(self.columns))
        columns[layer:] = [cols] * (num_layers - layer)
        start = self.renumber_from
        if renumber and (start is None or layer < start):
            start = layer
        return replace(self, columns=tuple(columns), renumber_from=start)

    def renumbered(self, layer: int) -> bool:
        """Whether `layer` numbers its prompt columns compactly (see `renumber_from`)."""
        return self.renumber_from is not None and layer >= self.renumber_from


@dataclass(frozen=True)
class PromptBatch:
    """Model inputs for R rows, left padded: everything a prefill forward needs."""

    input_ids: torch.Tensor  # long [R, S]
    attention_mask: torch.Tensor  # long [R, S]
    pixel_values: torch.Tensor | None  # images of all rows, in row order
    image_sizes: torch.Tensor | None  # NeXT / OneVision only
    image_rows: torch.Tensor  # long [n_images]: the row each image belongs to
    layout: ImageLayout
    # per sample: {view name: description per image} of views that transformed images (RITUAL)
    view_notes: tuple[dict[str, list[str]], ...] = ()
    # per sample: image tokens of its prompt before a vision stage cut any (see build_rows)
    image_tokens: tuple[int, ...] = ()

    def index_rows(self, rows: torch.Tensor) -> PromptBatch:
        """These rows (long [R'], repeats allowed), each with its own images, in row order."""
        pairs = (rows[:, None] == self.image_rows[None]).nonzero()  # (new row, image), in order
        images = pairs[:, 1]
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            pixel_values=None if self.pixel_values is None else self.pixel_values[images],
            image_sizes=None if self.image_sizes is None else self.image_sizes[images],
            image_rows=pairs[:, 0],
            layout=self.layout.index_rows(rows),
        )

    @property
    def position_ids(self) -> torch.Tensor:
        """transformers' convention for left padding: cumsum of the mask, 0 on padding."""
        positions = self.attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, 0)


def resolve(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """`resolve(model, "model.language_model.layers")` -> that submodule."""
    return operator.attrgetter(path)(module)


def default_model_path() -> Path:
    """The bundled model: the gym's trained tiny LLaVA (specs/gym.md)."""
    path = Path(__file__).parent / "gym" / "checkpoint"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the bundled checkpoint is missing from {path}")
    return path


DeviceMap = str | dict[str, int | str | torch.device]
DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str | None) -> torch.dtype | None:
    """One of DTYPES as a torch dtype (None for "auto"/None: the checkpoint's own)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPES}")
    return getattr(torch, name)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device,
    dtype: torch.dtype | None,
    device_map: DeviceMap | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load model + processor of any supported family, detected from the config.

    device_map (instead of `device`): passed to transformers' `from_pretrained` as is, e.g.
    "auto" to spread a checkpoint too large for one GPU over all of them (layer by layer, with
    accelerate's hooks moving activations between them), or a dict of module name -> device.
    Needs the `accelerate` package, as transformers does.
    """
    spec = FAMILIES[_family(AutoConfig.from_pretrained(name_or_path).model_type, name_or_path)]
    processor = spec.processor_class.from_pretrained(name_or_path)
    if device_map is not None:
        model = spec.model_class.from_pretrained(
            name_or_path, dtype=dtype or "auto", device_map=device_map
        )
        return model, processor
    model = spec.model_class.from_pretrained(name_or_path, dtype=dtype or "auto")
    return model.to(device), processor


def layer_devices(model: PreTrainedModel, family: str) -> list[torch.device]:
    """Where each decoder layer runs: one device, unless the model was split (device_map)."""
    return [_runs_on(layer) for layer in resolve(model, FAMILIES[family].decoder_layers)]


def _runs_on(module: torch.nn.Module) -> torch.device:
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)  # accelerate
    return torch.device(device) if device is not None else next(module.parameters()).device


def family_of(model: PreTrainedModel) -> str:
    """The `FAMILIES` key of a loaded model, read from its config; refuses what we cannot drive."""
    family = _family(model.config.model_type, type(model).__name__)
    expected = FAMILIES[family].model_class
    if not isinstance(model, expected):  # e.g. the bare LlavaModel: no LM head to decode with
        raise TypeError(
            f"lvlm_fix wraps {expected.__name__} for model type {family!r}, "
            f"got {type(model).__name__}"
        )
    return family


def _family(model_type: str, where: object) -> str:
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model type {model_type!r} in {where}; "
            f"lvlm_fix supports {sorted(FAMILIES)}"
        )
    return model_type


def model_info(
    model: PreTrainedModel, processor: ProcessorMixin, family: str, name: str, path: str = ""
) -> ModelInfo:
    text = model.config.text_config
    heads = text.num_attention_heads
    gap, tail = query_span(processor, model.config.image_token_id)
    return ModelInfo(
        family=family,
        text_model_type=text.model_type,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        image_token_id=model.config.image_token_id,
        name=name,
        path=path,
        image_size=model.config.vision_config.image_size,
        query_gap=gap,
        query_tail=tail,
    )


def query_span(processor: ProcessorMixin, image_token_id: int) -> tuple[int, int]:
    """(tokens between a one-image prompt's image slot and the user's text, tokens after it).

    Two prompts that differ only in their text share the template's tokens around it: the
    common prefix (after the image slot) and the common suffix of their ids are the template's.
    """
    ids = []
    for text in ("red cat sat", "where are two dogs"):
        prompt = processor.tokenizer(render_prompt(processor, text, 1)).input_ids
        ids.append(prompt[prompt.index(image_token_id) + 1 :])
    first, second = ids
    gap = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    backwards = zip(first[::-1], second[::-1], strict=False)
    tail = next(i for i, (a, b) in enumerate(backwards) if a != b)
    return gap, tail


def render_prompt(processor: ProcessorMixin, text: str, n_images: int) -> str:
    """The model's chat template around one user turn: n_images image slots, then `text`."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return DEFAULT_PROMPT.format(images="<image>\n" * n_images, text=text)


@dataclass(frozen=True)
class Turn:
    """One chat message: its role (system, user, assistant) and its parts in the order they were
    sent, each a text or None for an image slot."""

    role: str
    parts: tuple[str | None, ...]


def render_chat(processor: ProcessorMixin, turns: tuple[Turn, ...], images: bool = True) -> str:
    """The model's chat template over a whole conversation, parts in the order sent, ending with
    the assistant's generation prompt. `images=False` leaves the image slots out (text-only views).

    A template that never mentions the system role would render a system turn as some other
    role (LLaVA-1.5's official one: as an assistant turn), so there the system texts go in front
    of the first user turn's parts instead.
    """
    template = getattr(processor, "chat_template", None)
    if not template:
        raise ValueError("this model has no chat template: send one user turn")
    if "system" not in template:
        turns = _system_into_first_user_turn(turns)
    messages = [
        {
            "role": turn.role,
            "content": [
                {"type": "image"} if part is None else {"type": "text", "text": part}
                for part in turn.parts
                if part is not None or images
            ],
        }
        for turn in turns
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _system_into_first_user_turn(turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
    system = [part for turn in turns if turn.role == "system" for part in turn.parts]
    rest = [turn for turn in turns if turn.role != "system"]
    if not system:
        return turns
    first_user = next((i for i, turn in enumerate(rest) if turn.role == "user"), None)
    if first_user is None:
        raise ValueError("a chat needs a user turn")
    joined = "\n".join(part for part in system if part is not None)
    user = rest[first_user]
    rest[first_user] = Turn("user", (f"{joined}\n", *user.parts))
    return tuple(rest)


def check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_rows(
    processor: ProcessorMixin,
    image_token_id: int,
    prompts: list[str],
    images: list[list[Image.Image]],
    device: torch.device,
) -> PromptBatch:
    """Tokenize R fully rendered prompts with their images into one left-padded batch."""
    flat = [check_image(image) for row in images for image in row]
    encoded = processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    image_mask = input_ids == image_token_id
    key_start = (attention_mask == 0).sum(-1)  # left padding: the first real column
    image_rows = torch.tensor([r for r, row in enumerate(images) for _ in row], dtype=torch.long)
    pixel_values = encoded.get("pixel_values")
    image_sizes = encoded.get("image_sizes")
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=None if pixel_values is None else pixel_values.to(device),
        image_sizes=None if image_sizes is None else image_sizes.to(device),
        image_rows=image_rows.to(device),
        layout=ImageLayout(image_mask=image_mask, key_start=key_start),
    )


def concat_rows(batches: Sequence[PromptBatch], pad_id: int) -> PromptBatch:
    """Several requests' rows as one batch (in order), each left-padded to the widest: their
    joint prefill. Unpruned layouts only; image tensors must agree in shape past the first dim
    (anyres crops of different counts do not: ValueError)."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.input_ids.shape[1] for b in batches)

    def left(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    def joined(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        present = [t for t in tensors if t is not None]
        if len({tuple(t.shape[1:]) for t in present}) > 1:
            raise ValueError("these requests' images cannot share one tensor")
        return torch.cat(present) if present else None

    offsets = list(accumulate((b.input_ids.shape[0] for b in batches[:-1]), initial=0))
    return PromptBatch(
        input_ids=torch.cat([left(b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([left(b.attention_mask, 0) for b in batches]),
        pixel_values=joined([b.pixel_values for b in batches]),
        image_sizes=joined([b.image_sizes for b in batches]),
        image_rows=torch.cat([b.image_rows + o for b, o in zip(batches, offsets, strict=True)]),
        layout=ImageLayout(
            image_mask=torch.cat([left(b.layout.image_mask, False) for b in batches]),
            key_start=torch.cat(
                [b.layout.key_start + width - b.input_ids.shape[1] for b in batches]
            ),
        ),  # fmt: skip
        view_notes=tuple(note for b in batches for note in b.view_notes),
        image_tokens=tuple(n for b in batches for n in b.image_tokens),
    )


def shrink_image_runs(batch: PromptBatch, budget: int, pad_id: int) -> PromptBatch:
    """Keep the first `budget` placeholders of each image (a vision stage emits only those).

    The processor expands `<image>` to the full feature count; a pruning vision tower hands
    the LLM `budget` features per image, so each image's run of placeholders is cut to match,
    and the rows are re-packed with left padding.
    """
    ids, mask = batch.input_ids, batch.attention_mask
    rows = ids.shape[0]
    per_row = torch.bincount(batch.image_rows, minlength=rows).to(ids.device)  # images per row
    image = batch.layout.image_mask
    full = image.sum(-1) // per_row.clamp(min=1)  # placeholders per image, per row
    if bool((full[per_row > 0] <= budget).all()):
        return batch
    rank = (image.long().cumsum(-1) - 1) % full.clamp(min=1)[:, None]  # index within its image
    keep = (mask.bool() & ~image) | (image & (rank < budget))
    return _keep_columns(batch, keep, pad_id)


def drop_image_tokens(batch: PromptBatch, rows: torch.Tensor, pad_id: int) -> PromptBatch:
    """Text-only rows from full ones: rows `rows` (bool [R]) lose their image tokens and their
    images, so their ids are the prompt's ids minus the image tokens, re-packed left-padded
    (positions then follow as if the prompt had no image)."""
    keep = batch.attention_mask.bool() & ~(batch.layout.image_mask & rows[:, None])
    packed = _keep_columns(batch, keep, pad_id)
    images = ~rows[batch.image_rows]
    return replace(
        packed,
        pixel_values=None if batch.pixel_values is None else batch.pixel_values[images],
        image_sizes=None if batch.image_sizes is None else batch.image_sizes[images],
        image_rows=batch.image_rows[images],
    )


def _keep_columns(batch: PromptBatch, keep: torch.Tensor, pad_id: int) -> PromptBatch:
    """The batch with only the columns `keep` (bool [R, S]) of each row, left-padded again."""
    ids, image = batch.input_ids, batch.layout.image_mask
    lengths = keep.sum(-1)
    width = int(lengths.max())
    order = torch.sort(keep.long(), dim=-1, stable=True).indices[:, -width:]  # kept, in order
    slot = torch.arange(width, device=ids.device)[None] >= (width - lengths)[:, None]
    new_ids = torch.where(slot, ids.gather(1, order), pad_id)
    new_mask = slot.long()
    new_image = slot & image.gather(1, order)
    layout = ImageLayout(image_mask=new_image, key_start=width - lengths)
    return replace(batch, input_ids=new_ids, attention_mask=new_mask, layout=layout)
