"""`LVLM`: the in-process API. Load once, then generate with any set of interventions.

lvlm = LVLM.from_pretrained()                      # the bundled gym model
lvlm = LVLM(model, processor)                      # or a model you loaded with transformers
[out] = lvlm.generate([Sample("Describe the image.", (image,))],
                      interventions=[{"name": "vhr"}])

Every request runs on the model's one `Engine` (started on first use), so calls from several
threads batch continuously, whatever their interventions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from lvlm_fix import attention, fused_step
from lvlm_fix.decoding import Sample
from lvlm_fix.engine import Engine, EngineConfig, Event, Request
from lvlm_fix.generation import Generation, TextPieces
from lvlm_fix.hooks import install_hook_points
from lvlm_fix.methods import Intervention
from lvlm_fix.model import (
    FAMILIES,
    DeviceMap,
    ModelInfo,
    default_model_path,
    family_of,
    load_model,
    model_info,
)
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import Plan, compile_plan

InterventionSpec = Intervention | dict[str, Any]


class LVLM:
    """A loaded LLaVA-family model with the hook points our interventions use.

    engine: the sizes of the model's engine (`EngineConfig`; default: sized at start).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        name: str | None = None,
        engine: EngineConfig | None = None,
    ):
        """Wrap a loaded LLaVA-family model (family read from its config) and its processor.

        Changes both in place: the language model switches to our attention, its q/k/v and
        gate/up weights become views of one fused tensor per layer (for the engine's fused
        step; `fused_step.py`), the tokenizer pads on the left (decoding appends on the right),
        and the hook points are installed.
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
        self.engine_config = engine or EngineConfig()
        path = model.name_or_path  # where transformers loaded it from ("" if built in memory)
        self.info: ModelInfo = model_info(
            model, processor, self.family, name or path or self.family, path
        )
        install_hook_points(model, FAMILIES[self.family])
        if fused_step.unsupported(model, self.info) is None:
            fused_step.fused_layers(model, self.info)  # at load: before any graph is captured
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        engine: EngineConfig | None = None,
        device_map: DeviceMap | None = None,
    ) -> LVLM:
        """Load a llava-hf style checkpoint (a local path; the hub only if online).

        device_map: instead of `device`, transformers' placement, e.g. "auto" to split a
        checkpoint too large for one GPU (LLaVA-NeXT-34B, OneVision-72B) over every visible GPU,
        layer by layer; or a dict of module name -> device. Interventions and the engine work
        on a split model (its shared decode steps run without CUDA graphs). Needs `accelerate`.
        """
        model, processor = load_model(
            name_or_path or default_model_path(), device, dtype, device_map
        )
        return cls(model, processor, name=str(name_or_path or "gym"), engine=engine)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def engine(self) -> Engine:
        """The model's engine, started on first use (on a GPU that captures its graphs)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self, self.engine_config)
            return self._engine

    def close(self) -> None:
        """Stop the engine (unfinished requests end with `engine.Cancelled`)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def plan(
        self, interventions: Sequence[InterventionSpec] = (), params: GenerationParams | None = None
    ) -> Plan:
        """Compile interventions for this model (raises ValueError naming any problem)."""
        return compile_plan(list(interventions), self.info, params or GenerationParams())

    def submit(
        self,
        samples: Sequence[Sample | tuple[str, Image.Image | None]],
        interventions: Sequence[InterventionSpec] = (),
        params: GenerationParams | None = None,
        *,
        plan: Plan | None = None,
        listener: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request on the engine and return at once (see `engine.Request`).

        `plan`: already compiled from these interventions and params (a server compiles it
        once, to refuse a bad request before queueing it).
        """
        params = params or GenerationParams()
        plan = plan or self.plan(interventions, params)
        samples = [_as_sample(s, params.seed) for s in samples]
        return self.engine.submit(samples, plan, params, listener)

    def generate(
        self,
        samples: Sequence[Sample | tuple[str, Image.Image | None]],
        interventions: Sequence[InterventionSpec] = (),
        params: GenerationParams | None = None,
        *,
        on_step: Callable[[], None] | None = None,
    ) -> list[Generation]:
        """Generate for a batch of samples; rows never influence each other.

        `on_step` is called (on the engine's thread) after each decode step has chosen its
        tokens (the first call marks the end of prefill).
        """
        listener = None
        if on_step is not None:

            def listener(event: Event) -> None:
                if not event.done:
                    on_step()

        return self.submit(samples, interventions, params, listener=listener).result()

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
        Setting `cancel` (from any thread) ends decoding at the next step, with no final
        `Generation`; so does closing the iterator.
        """
        params = params or GenerationParams()
        if params.num_beams > 1:
            raise ValueError("streaming needs num_beams=1: beams are only decided at the end")
        plan = self.plan(interventions, params)
        if plan.search.width > 1:
            raise ValueError("streaming is not available with a beam search strategy")
        pieces: queue.SimpleQueue[str | Generation | BaseException] = queue.SimpleQueue()
        text = TextPieces(self.processor.tokenizer, params)

        def listener(event: Event) -> None:  # on the engine's thread, which owns the tokenizer
            for item in [event.error] if event.error is not None else text.take(event):
                pieces.put(item)

        request = self.submit([sample], params=params, plan=plan, listener=listener)
        try:
            while True:
                try:
                    piece = pieces.get(timeout=0.05)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        return
                    continue
                if cancel is not None and cancel.is_set():
                    return
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
                if isinstance(piece, Generation):
                    return
        finally:
            request.cancel()  # a no-op once it finished; else it leaves the batch at its next step


def _as_sample(sample: Sample | tuple, seed: int | None) -> Sample:
    if isinstance(sample, Sample):
        return sample if sample.seed is not None or seed is None else replace(sample, seed=seed)
    if not isinstance(sample, tuple) or len(sample) != 2 or not isinstance(sample[0], str):
        raise TypeError("a sample is Sample(text, images) or a (text, image-or-None) tuple")
    text, image = sample
    images = () if image is None else tuple(image) if isinstance(image, list) else (image,)
    return Sample(text, images, seed)
