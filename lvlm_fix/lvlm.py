"""`LVLM`: the in-process API. Load once, then generate with any set of interventions.

lvlm = LVLM.from_pretrained()                      # the bundled gym model
lvlm = LVLM(model, processor)                      # or a model you loaded with transformers
[out] = lvlm.generate([Sample("Describe the image.", (image,))],
                      interventions=[{"name": "vhr"}])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel
from transformers import PreTrainedModel, ProcessorMixin

from lvlm_fix import attention
from lvlm_fix.decoding import DecodeEvent, Sample, decode
from lvlm_fix.hooks import install_hook_points
from lvlm_fix.methods import Intervention
from lvlm_fix.model import (
    FAMILIES,
    ModelInfo,
    default_model_path,
    family_of,
    load_model,
    model_info,
)
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan, compile_plan
from lvlm_fix.search import Limits, TokenLogprobs

InterventionSpec = Intervention | dict[str, Any]


class Generation(BaseModel):
    """One sample's output. The HTTP client returns the same objects."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    config_id: str  # stable hash of the interventions used
    views: dict[str, list[str]] = {}  # what each image-transforming view applied, per image
    logprobs: list[TokenLogprobs] | None = None  # with params.logprobs: one per token_ids entry


class LVLM:
    """A loaded LLaVA-family model with the hook points our interventions use.

    static_decode: run decode steps over a static KV cache where a request allows it (greedy or
    sampling, no pruning): None = on a GPU, where each step replays a CUDA graph; True = also
    on CPU (no graph); False = never.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        name: str | None = None,
        static_decode: bool | None = None,
    ):
        """Wrap a loaded LLaVA-family model (family read from its config) and its processor.

        Changes both in place: the language model switches to our attention, the tokenizer pads
        on the left (decoding appends on the right), and the hook points are installed.
        """
        self.family = family_of(model)
        if not isinstance(processor, ProcessorMixin):  # e.g. a bare tokenizer
            expected = FAMILIES[self.family].processor_class.__name__
            raise TypeError(
                f"expected the model's processor ({expected}), got {type(processor).__name__}"
            )
        attention.use_for_text_model(model)
        processor.tokenizer.padding_side = "left"
        self.model = model.eval()
        self.processor = processor
        self.static_decode = static_decode
        path = model.name_or_path  # where transformers loaded it from ("" if built in memory)
        self.info: ModelInfo = model_info(model, self.family, name or path or self.family, path)
        install_hook_points(model, FAMILIES[self.family])

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        static_decode: bool | None = None,
    ) -> LVLM:
        """Load a llava-hf style checkpoint (a local path; the hub only if online)."""
        model, processor = load_model(name_or_path or default_model_path(), device, dtype)
        return cls(model, processor, name=str(name_or_path or "gym"), static_decode=static_decode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def plan(
        self, interventions: Sequence[InterventionSpec] = (), params: GenerationParams | None = None
    ) -> Plan:
        """Compile interventions for this model (raises ValueError naming any problem)."""
        return compile_plan(list(interventions), self.info, params or GenerationParams())

    def _run(self, samples, interventions, params) -> Iterator[tuple[DecodeEvent, Plan]]:
        params = params or GenerationParams()
        plan = self.plan(interventions, params)
        samples = [_as_sample(s, params.seed) for s in samples]
        if not samples:
            raise ValueError("no samples to generate for")
        tokenizer = self.processor.tokenizer
        limits = Limits(
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            max_new_tokens=params.max_new_tokens,
            generators=[_generator(s.seed, self.device) for s in samples],
            stop_hit=_stop_checker(tokenizer, params.stop) if params.stop else None,
        )
        info, static = self.info, self.static_decode
        for event in decode(self.model, self.processor, info, plan, samples, limits, static):
            yield event, plan

    def generate(
        self,
        samples: Sequence[Sample | tuple[str, Image.Image | None]],
        interventions: Sequence[InterventionSpec] = (),
        params: GenerationParams | None = None,
        *,
        on_step: Callable[[], None] | None = None,
    ) -> list[Generation]:
        """Generate for a batch of samples; rows never influence each other.

        `on_step` is called after each decode step has chosen its tokens (the first call marks
        the end of prefill), e.g. to time a request the way a server reports it.
        """
        for event, plan in self._run(samples, interventions, params):
            if event.result is not None:
                return self._finish(event, plan, params)
            if on_step is not None:
                on_step()
        raise RuntimeError("decoding ended without a result")

    def stream(
        self,
        sample: Sample | tuple[str, Image.Image | None],
        interventions: Sequence[InterventionSpec] = (),
        params: GenerationParams | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> Iterator[str | Generation]:
        """Yield text pieces of one sample as they are generated, then its final `Generation`.

        The pieces concatenate to the final text: a piece is sent only once no later token can
        change it (an unfinished multi-byte character, a possible start of a stop string and
        trailing whitespace wait). Greedy or sampling only: beams are decided at the end.
        Setting `cancel` (from any thread) ends decoding after the current step, with no final
        `Generation`: steps that yield no text would not reach a `close()`.
        """
        params = params or GenerationParams()
        if params.num_beams > 1:
            raise ValueError("streaming needs num_beams=1: beams are only decided at the end")
        tokenizer = self.processor.tokenizer
        sent, ids = "", []
        for event, plan in self._run([sample], interventions, params):
            if cancel is not None and cancel.is_set():
                return  # leaving the loop closes `_run`, and with it the decode loop
            if event.result is not None:
                [final] = self._finish(event, plan, params)
                if len(final.text) > len(sent):
                    yield final.text[len(sent) :]
                yield final
                return
            if plan.search.width > 1:
                raise ValueError("streaming is not available with a beam search strategy")
            ids.append(int(event.tokens[0, 0]))
            text, stopped = _answer(tokenizer, ids, params.stop)
            settled = text if stopped else _settled(text, params.stop)
            if len(settled) > len(sent):
                yield settled[len(sent) :]
                sent = settled

    def _finish(
        self, event: DecodeEvent, plan: Plan, params: GenerationParams | None
    ) -> list[Generation]:
        params = params or GenerationParams()
        tokenizer = self.processor.tokenizer
        outputs = []
        result = event.result
        notes = event.view_notes or ({},) * len(result.tokens)
        logprobs = result.logprobs or (None,) * len(result.tokens)
        rows = zip(
            result.tokens, result.finish_reasons, event.prompt_tokens, notes, logprobs, strict=True
        )
        for ids, reason, prompt_tokens, views, steps in rows:
            text, stopped = _answer(tokenizer, ids, params.stop)
            outputs.append(
                Generation(
                    text=text,
                    token_ids=ids,
                    finish_reason="stop" if stopped else reason,
                    prompt_tokens=prompt_tokens,
                    config_id=plan.config_id,
                    views=views,
                    logprobs=steps,
                )
            )
        return outputs


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # No clean-up of spaces: it rewrites earlier text as tokens arrive (" ." -> "."), so streamed
    # pieces could not add up to the final text (and transformers warns about it for BPE).
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _answer(tokenizer, ids: Sequence[int], stops: Sequence[str]) -> tuple[str, bool]:
    """The answer text of generated `ids`: cut before the first stop string, then stripped of
    surrounding whitespace; and whether a stop string was found."""
    text = _decode(tokenizer, ids)
    cut = min((text.index(stop) for stop in stops if stop in text), default=None)
    return text[:cut].strip(), cut is not None


def _settled(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer that later tokens cannot change.

    Later tokens can complete a trailing replacement character (a multi-byte character split
    over tokens) or a stop string begun by the text's end (which cuts the answer there), and
    the final answer drops whitespace before either cut or its end.
    """
    text = text.rstrip("\ufffd")
    begun = [n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])]
    return text[: len(text) - max(begun, default=0)].rstrip()


def _as_sample(sample: Sample | tuple, seed: int | None) -> Sample:
    if isinstance(sample, Sample):
        return sample if sample.seed is not None or seed is None else replace(sample, seed=seed)
    if not isinstance(sample, tuple) or len(sample) != 2 or not isinstance(sample[0], str):
        raise TypeError("a sample is Sample(text, images) or a (text, image-or-None) tuple")
    text, image = sample
    images = () if image is None else tuple(image) if isinstance(image, list) else (image,)
    return Sample(text, images, seed)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _stop_checker(tokenizer, stops: tuple[str, ...]):
    def hit(_: int, ids: list[int]) -> bool:
        text = _decode(tokenizer, ids[-32:])
        return any(stop in text for stop in stops)

    return hit
