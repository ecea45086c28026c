"""Streamed text (`TextPieces`) decodes each token incrementally; what it has sent after every
token must equal the rule written out in full (decode every token so far, cut at a stop
string, keep what later tokens cannot change), on a byte-level BPE tokenizer (Qwen2's kind,
the tiny models') and a SentencePiece-style one with byte fallback (Llama's and LLaVA-1.5's)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from lvlm_fix import GenerationParams
from lvlm_fix.generation import TextPieces, answer, generation, settled
from lvlm_fix.tiny import train_tokenizer

CORPUS = [
    "a photo of a cat and a dog on a red sofa near the window",
    "the star in the picture on the left is yellow; the sky is blue.",
    "Ein Bild mit zwei Katzen, größer als üblich. 一只猫和一只狗 🐱🐶",
    "numbers 12, 345 and 6789 --- end of story ...",
]
OUTSIDE = "一只猫和狗🐱🐶"
TEXTS = [
    "a cat, a dog and a red sofa.",
    "größer als 一只猫 🐱 near the window",
    "  leading spaces and trailing ones   ",
    "the end. END then more text after it",
]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama's tokenizer layout: "▁" for spaces, BPE with byte fallback (<0xNN> tokens), and
    the decoder that turns "▁" back into spaces and drops the first one."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    # characters outside the alphabet (the CJK ones, the emoji) are spelled in bytes
    alphabet = sorted({c for text in CORPUS for c in normalizer.normalize_str(text)} - set(OUTSIDE))
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )  # fmt: skip
    learner.train_from_iterator(CORPUS, trainer=trainer)
    learned = learner.get_vocab()
    vocab = {token: i for i, token in enumerate(sorted(learned, key=learned.get))}
    for byte in range(256):  # what a character outside the vocabulary is spelled with
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tokenizer(request):
    return (
        train_tokenizer(CORPUS) if request.param == "byte_level_bpe" else sentencepiece_tokenizer()
    )


def sent_in_full(tokenizer, ids: list[int], params: GenerationParams) -> list[str]:
    """The text sent after each token when every token decodes the whole answer again: the
    settled part of the answer, sent once it is longer than what was sent."""
    sent, out = "", []
    for n in range(1, len(ids) + 1):
        text, stopped = answer(tokenizer, ids[:n], params.stop, params.min_tokens)
        done = text if stopped else settled(text, params.stop)
        if len(done) > len(sent):
            sent += done[len(sent) :]
        out.append(sent)
    return out


def stream(tokenizer, ids: list[int], params: GenerationParams) -> tuple[list[str], str]:
    """What `TextPieces` has sent after each token, and everything it sends, the rest included
    once the final `Generation` (decoded whole) comes."""
    pieces, sent, out = TextPieces(tokenizer, params), "", []
    for token in ids:
        sent += pieces.add(token)
        out.append(sent)
    final = generation(tokenizer, ids, "length", params, 0, "", {}, None)
    return out, sent + pieces.finish(final)


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(),
        GenerationParams(stop=("END", ". E")),
        GenerationParams(stop=("the",), min_tokens=3),
    ],  # fmt: skip
    ids=["plain", "stops", "stops-after-min-tokens"],
)
def test_pieces_follow_the_full_decode_on_real_text(tokenizer, params):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids).strip() == text.strip()
        sent, everything = stream(tokenizer, ids, params)
        final = generation(tokenizer, ids, "length", params, 0, "", {}, None).text
        assert everything == final
        assert sent == sent_in_full(tokenizer, ids, params)
        assert all(final.startswith(s) for s in sent)  # nothing sent is taken back


def test_pieces_follow_the_full_decode_on_random_tokens(tokenizer):
    """Any id may come: special tokens, and on the byte-level tokenizer bytes that never
    complete a character. Not the byte-fallback tokens: a run of them that is not UTF-8 turns
    every byte of the run into U+FFFD, even ASCII ones, so the whole decode rewrites characters
    it had shown and no streamed text can agree with it. (Real text stays valid UTF-8: the test
    above streams byte-fallback characters.)"""
    rng = random.Random(0)
    params = GenerationParams(stop=("the", "--"))
    vocab = tokenizer.get_vocab()
    ids_allowed = sorted(i for t, i in vocab.items() if not (t.startswith("<0x") and len(t) == 6))
    for _ in range(40):
        ids = [rng.choice(ids_allowed) for _ in range(rng.randrange(1, 40))]
        sent, _ = stream(tokenizer, ids, params)
        assert sent == sent_in_full(tokenizer, ids, params), ids


def test_sentencepiece_tokenizer_spells_unknown_characters_in_bytes():
    """The test tokenizer really exercises byte fallback: 猫 is three <0xNN> tokens."""
    tok = sentencepiece_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("猫", add_special_tokens=False)["input_ids"])
    assert tokens[-3:] == ["<0xE7>", "<0x8C>", "<0xAB>"], tokens
