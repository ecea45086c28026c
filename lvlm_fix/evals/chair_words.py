"""CHAIR word extraction: caption -> COCO object mentions (the reference's caption_to_words).

Follows OPERA's chair.py ("the reference"): lower-case, tokenize, lemmatize, merge double words
("hot dog", "baby elephant" -> elephant, "passenger jet" -> jet, "toilet seat" -> toilet, ...),
drop "seat" when "toilet" is present, keep units that are in the synonym vocabulary and map each
to its node word (the COCO category name).

Documented non-compat deviation (both modes): the reference runs NLTK's Punkt sentence
splitter, POS tagger and WordNet lemmatizer, whose data cannot be downloaded on our machines.
We split sentences on [.!?] followed by whitespace, tokenize each sentence with
NLTKWordTokenizer (the data-free Treebank tokenizer that `nltk.word_tokenize` applies per
sentence) and lemmatize every token as a NOUN with lemminflect (its data ships in the package).
The original CHAIR (pattern.en `singularize` on every token) also ignored POS, so this is close
to it: dogs->dog, glasses->glass, men->man, children->child, tvs->tv; "bus", "glass" stay;
"skis"->"ski" (both are skis entries); "people" is itself a person entry. Guards: vocabulary
entries, non-ASCII-word tokens and words the lexicon knows only as non-nouns ("was",
"skiing") are kept as they are. Where the reference's tagger says verb, results can differ:
"skiing"/"skateboarding"/"tied" never count here (the reference may lemmatize them to
ski/skateboard/tie and count a mention), and "dining"/"potted"/"parking" are never verb-
lemmatized, so those double words always merge. Punkt's abbreviation handling ("mr.") is not
reproduced; it can change Len by a unit.

Modes (the `compat` flag of load_synonyms, set from ChairConfig.compat):
* compat=True keeps the reference's rule-level quirks: synonym lines are split on ", " without
  stripping or lower-casing, the reference's dead entries ("motor bike", "cheesecake", "iphone")
  never match, and only the reference's double-word list is merged. "motor bike" therefore
  merges into one unit and then yields nothing. The synonym TABLE is our own
  (data/coco_synonyms.txt), so numbers are close to, not identical with, the reference's;
  pass the reference's synonyms file for the table itself.
* compat=False (default) strips and lower-cases entries and also merges every two-word synonym
  entry ("motor bike" -> motorcycle, "hair dryer" -> hair drier, "dining table" is one unit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lemminflect import getAllLemmas, getLemma
from nltk.tokenize import NLTKWordTokenizer

DEFAULT_SYNONYMS = Path(__file__).parent / "data" / "coco_synonyms.txt"

# Reference double words that map to themselves. "home plate" and "train track" are not COCO
# words: merging them only stops "plate"/"train" from firing. "stove top oven" has three words
# and can never match (only bigrams are checked); it is kept to mirror the reference list.
_IDENTITY_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby X" / "adult X" -> X, so that "baby"/"adult" do not fire *person*.
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
            "giraffe", "animal", "cub")  # fmt: skip
_OVERRIDES = {
    "passenger jet": "jet",  # "passenger" would otherwise fire *person*
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",  # "seat" would otherwise fire *chair*
    "wine glas": "wine glass",  # leftover from pattern's singularize("glass") == "glas"
}
# Entries that never match in the reference (leading space, capital letter); dropped in compat.
_COMPAT_DEAD_ENTRIES = frozenset({"motor bike", "cheesecake", "iphone"})
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
_LAST_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def reference_double_words() -> dict[str, str]:
    """The reference's bigram -> unit table."""
    table = {w: w for w in _IDENTITY_DOUBLE_WORDS}
    for animal in _ANIMALS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    table.update(_OVERRIDES)
    return table


@dataclass(frozen=True)
class Synonyms:
    """The synonym table: vocabulary string -> node word (COCO category name)."""

    to_node: Mapping[str, str]
    nodes: tuple[str, ...]  # line heads, file order
    compat: bool  # parsed the reference's way; also selects the reference's bigram list


def load_synonyms(path: str | Path | None = None, compat: bool = False) -> Synonyms:
    """Read a synonym file: one category per line, comma+space separated, head = node word."""
    path = Path(path) if path is not None else DEFAULT_SYNONYMS
    to_node: dict[str, str] = {}
    nodes: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if compat:  # the reference: strip the line, split on ", ", keep entries as they are
            entries = line.strip().split(", ")
        else:
            entries = [e.strip().lower() for e in line.split(",") if e.strip()]
            if not entries:
                continue
        nodes.append(entries[0])
        for entry in entries:
            if to_node.get(entry, entries[0]) != entries[0]:
                raise ValueError(
                    f"{path}: {entry!r} is listed under both {to_node[entry]!r} and {entries[0]!r}"
                )
            to_node[entry] = entries[0]
    if compat:
        for dead in _COMPAT_DEAD_ENTRIES:
            to_node.pop(dead, None)
    return Synonyms(to_node=MappingProxyType(to_node), nodes=tuple(nodes), compat=compat)


def drop_incomplete_sentence(text: str) -> str:
    """Cut everything after the last sentence end ('.', '!' or '?' before whitespace/end).

    A caption without any sentence end is returned unchanged: dropping it whole would turn a
    truncated caption into an empty, hence non-hallucinated, one.
    """
    ends = list(_LAST_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


@dataclass(frozen=True)
class CaptionObjects:
    """What one caption mentions."""

    units: tuple[str, ...]  # all units after double-word merging (their count is Len)
    words: tuple[str, ...]  # units in the vocabulary, caption order, duplicates kept
    nodes: tuple[str, ...]  # node word of each entry of `words`


@dataclass
class WordExtractor:
    """Caption -> COCO object mentions (the reference's caption_to_words)."""

    synonyms: Synonyms
    double_words: dict[str, str] = field(init=False)
    _tokenizer: NLTKWordTokenizer = field(init=False, repr=False)
    _lemmas: dict[str, str] = field(init=False, repr=False)  # memo: token -> noun lemma

    def __post_init__(self) -> None:
        self.double_words = reference_double_words()
        if not self.synonyms.compat:  # every two-word vocabulary entry becomes reachable
            for entry in self.synonyms.to_node:
                if len(entry.split(" ")) == 2:
                    self.double_words.setdefault(entry, entry)
        self._tokenizer = NLTKWordTokenizer()
        self._lemmas = {}

    def tokens(self, caption: str) -> list[str]:
        """Lower-case, split sentences, Treebank-tokenize: "dogs. the" -> dogs . the."""
        sentences = _SENTENCE_BREAK.split(caption.lower().strip())
        return [tok for s in sentences if s for tok in self._tokenizer.tokenize(s)]

    def lemma(self, token: str) -> str:
        """Noun lemma: dogs->dog, men->man, glasses->glass, tvs->tv.

        Kept as they are: vocabulary entries (already lemmas; lemminflect's rules for unknown
        words would turn "corgi" into "corgus"), tokens that are not plain ASCII words
        (punctuation, "'s", numbers) and words the lexicon knows only as non-nouns ("was",
        "skiing"), which the noun rules would only mangle ("was" -> "wa").
        """
        if token not in self._lemmas:
            self._lemmas[token] = self._noun_lemma(token)
        return self._lemmas[token]

    def _noun_lemma(self, token: str) -> str:
        if token in self.synonyms.to_node or not _WORD.fullmatch(token):
            return token
        known = getAllLemmas(token)  # lexicon only: {upos: lemmas}
        if "NOUN" in known:
            return known["NOUN"][0]
        if known:
            return token
        guessed = getLemma(token, upos="NOUN")  # unknown word: lemminflect's noun rules
        return guessed[0] if guessed else token

    def units(self, caption: str) -> list[str]:
        """Lemmas with double words merged, scanning left to right."""
        lemmas = [self.lemma(t) for t in self.tokens(caption)]
        units, i = [], 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i : i + 2])
            if i + 1 < len(lemmas) and pair in self.double_words:
                units.append(self.double_words[pair])
                i += 2
            else:
                units.append(lemmas[i])
                i += 1
        return units

    def extract(self, caption: str) -> CaptionObjects:
        units = self.units(caption)
        candidates = units
        if "toilet" in units and "seat" in units:  # "the seat of the toilet" is no chair
            candidates = [u for u in units if u != "seat"]
        words = tuple(u for u in candidates if u in self.synonyms.to_node)
        nodes = tuple(self.synonyms.to_node[w] for w in words)
        return CaptionObjects(units=tuple(units), words=words, nodes=nodes)
