"""What a finished sample becomes (`Generation`), and the text rules shared by every way of
getting one: the answer is cut at the first stop string and stripped; a streamed piece is sent
only once later tokens cannot change it.

Stop strings and min_tokens act as in vLLM: its detokenizer checks stop strings only once a
sample has more than min_tokens tokens, in the text that came after the first min_tokens tokens,
so a stop string counts only where it ends after their text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel

from lvlm_fix.params import GenerationParams
from lvlm_fix.search import TokenLogprobs

if TYPE_CHECKING:
    from lvlm_fix.engine import Event


class Generation(BaseModel):
    """One sample's output. The HTTP client returns the same objects."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    config_id: str  # stable hash of the interventions used
    views: dict[str, list[str]] = {}  # what each image-transforming view applied, per image
    logprobs: list[TokenLogprobs] | None = None  # with params.logprobs: one per token_ids entry
    image_tokens_pruned: int = 0  # image tokens that token pruning removed (FastV, FlowCut, ...)
    # The language model's attention paths that ran for it: "sdpa" (stock), "fused" (the fused
    # edited-attention kernel; its plain-torch reference off CUDA), "modifiers" (the plain-torch
    # path of edits the fused kernel does not cover: correct, slower).
    attention_paths: list[str] = []


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    # No clean-up of spaces: it rewrites earlier text as tokens arrive (" ." -> "."), so streamed
    # pieces could not add up to the final text (and transformers warns about it for BPE).
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def answer(
    tokenizer, ids: Sequence[int], stops: Sequence[str], min_tokens: int = 0
) -> tuple[str, bool]:
    """The answer text of generated `ids`: cut before the first stop string (one that ends
    after the first min_tokens tokens' text), then stripped of surrounding whitespace; and
    whether a stop string was found."""
    text = decode_text(tokenizer, ids)
    cut = _first_stop(text, stops, _unchecked(tokenizer, ids, min_tokens))
    return text[:cut].strip(), cut is not None


def _unchecked(tokenizer, ids: Sequence[int], min_tokens: int) -> int:
    """How many leading characters of the text of `ids` stop strings cannot end in: those of
    its first min_tokens tokens. A character they leave unfinished (U+FFFD) is completed by a
    later token, whose text vLLM checks."""
    if min_tokens <= 0:
        return 0
    return len(decode_text(tokenizer, ids[:min_tokens]).rstrip("\ufffd"))


def _first_stop(text: str, stops: Sequence[str], unchecked: int) -> int | None:
    """Where the first stop string in `text` that ends after text[:unchecked] begins."""
    starts = (text.find(stop, max(unchecked - len(stop) + 1, 0)) for stop in stops)
    return min((start for start in starts if start >= 0), default=None)


def settled(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer that later tokens cannot change.

    Later tokens can complete a trailing replacement character (a multi-byte character split
    over tokens) or a stop string begun by the text's end (which cuts the answer there), and
    the final answer drops whitespace before either cut or its end.
    """
    text = text.rstrip("\ufffd")
    begun = [n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])]
    return text[: len(text) - max(begun, default=0)].rstrip()


class TextPieces:
    """One sample's answer as it streams: `add` each chosen token and get the newly settled
    text, then `finish` with the final `Generation` for the rest; the pieces concatenate to its
    text. Uses the tokenizer: call it from the thread that owns it (the engine's).

    The text grows incrementally, as vLLM's detokenizer does: each token decodes a short window
    (the tokens since the last piece of text, after the tokens of the piece before it, which give
    the decoder its context: a SentencePiece decoder drops the space of a window's first word),
    not the whole answer again, which would cost O(n) per token and O(n^2) per answer.
    """

    def __init__(self, tokenizer, params: GenerationParams):
        self.tokenizer, self.params = tokenizer, params
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read]; ids[read:] have none yet (or half a character)
        self.context = 0  # ids[context:read]: decoded again before the new tokens
        self.read = 0
        self.unchecked: int | None = None  # min_tokens' text length, once there are min_tokens
        self.sent = ""

    def add(self, token: int) -> str:
        if token in self.params.stop_token_ids:  # it ends the sample, outside its text
            return ""
        self.ids.append(token)
        text = self._decoded()
        stops, min_tokens = self.params.stop, self.params.min_tokens
        if len(self.ids) < min_tokens:  # no stop string counts yet
            return self._send(settled(text.strip(), stops))
        if self.unchecked is None:
            self.unchecked = _unchecked(self.tokenizer, self.ids, min_tokens)
        cut = _first_stop(text, stops, self.unchecked)
        if cut is not None:
            return self._send(text[:cut].strip())
        return self._send(settled(text.strip(), stops))

    def _decoded(self) -> str:
        """The text of every token so far (ending in U+FFFD inside an unfinished character).
        The new tokens' text becomes part of `text` once it ends on a whole character."""
        before = decode_text(self.tokenizer, self.ids[self.context : self.read])
        new = decode_text(self.tokenizer, self.ids[self.context :])[len(before) :]
        if not new or new.endswith("\ufffd"):  # no text yet (a special token), or half a character
            return self.text + new
        self.text += new
        self.context, self.read = self.read, len(self.ids)
        return self.text

    def finish(self, final: Generation) -> str:
        return self._send(final.text)

    def take(self, event: Event) -> list[str | Generation]:
        """What a stream yields for one engine event of its sample (not an error): newly
        settled text; at the end, the rest of the text and the final `Generation`."""
        if event.generations is not None:
            [final] = event.generations
            rest = self.finish(final)
            return [rest, final] if rest else [final]
        token = event.tokens[0]
        piece = self.add(token) if token is not None else ""
        return [piece] if piece else []

    def _send(self, done: str) -> str:
        if len(done) <= len(self.sent):
            return ""
        piece, self.sent = done[len(self.sent) :], done
        return piece


def stop_hit(tokenizer, stops: Sequence[str], ids: Sequence[int], min_tokens: int = 0) -> bool:
    """Whether the last tokens of `ids` spell one of the stop strings (one that ends after the
    first min_tokens tokens' text)."""
    if len(ids) <= min_tokens:
        return False
    start = max(len(ids) - 32, 0)
    window = ids[start:]
    unchecked = _unchecked(tokenizer, window, min_tokens - start)
    return _first_stop(decode_text(tokenizer, window), stops, unchecked) is not None


def sampling_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A sample's own token-sampling generator (seeded: its tokens never depend on others)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generation(
    tokenizer, ids: list[int], reason: str, params: GenerationParams, prompt_tokens: int,
    config_id: str, views: dict[str, list[str]], logprobs: list[TokenLogprobs] | None,
    image_tokens_pruned: int = 0, attention_paths: frozenset[str] = frozenset(),
) -> Generation:  # fmt: skip
    """One sample's `Generation` from its generated ids (the token that ended it excluded)."""
    text, stopped = answer(tokenizer, ids, params.stop, params.min_tokens)
    return Generation(
        text=text,
        token_ids=ids,
        finish_reason="stop" if stopped else reason,
        prompt_tokens=prompt_tokens,
        config_id=config_id,
        views=views,
        logprobs=logprobs,
        image_tokens_pruned=image_tokens_pruned,
        attention_paths=sorted(attention_paths),
    )
