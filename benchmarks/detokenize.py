"""Host time per streamed token: `TextPieces` (incremental) against decoding the whole answer
at every token (what it did before; what the stream's rule says, written out).

    python benchmarks/detokenize.py

The engine's thread runs this once per token of every streaming row between decode steps, so
at 32 rows it adds 32x this to each step. The tokenizer is the benchmarks' (common.py) filled to
LLaVA-1.5-7B's 32064 ids, as the random-weight 7B model's; ids are drawn at random.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CORPUS, SIZES  # noqa: E402

from lvlm_fix import GenerationParams  # noqa: E402
from lvlm_fix.generation import TextPieces, answer, settled  # noqa: E402
from lvlm_fix.tiny import train_tokenizer  # noqa: E402


class WholeAnswer:
    """Decode every token so far at every token, cut, settle, send the growth."""

    def __init__(self, tokenizer, params: GenerationParams):
        self.tokenizer, self.params, self.ids, self.sent = tokenizer, params, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text, stopped = answer(self.tokenizer, self.ids, self.params.stop, self.params.min_tokens)
        done = text if stopped else settled(text, self.params.stop)
        piece = done[len(self.sent) :] if len(done) > len(self.sent) else ""
        self.sent += piece
        return piece


def per_token_us(make, tokenizer, ids: list[int], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        pieces = make(tokenizer, GenerationParams(stop=("END",)))
        start = time.perf_counter()
        for token in ids:
            pieces.add(token)
        best = min(best, time.perf_counter() - start)
    return best / len(ids) * 1e6


def main() -> None:
    vocab = SIZES["llava-1.5-7b"].vocab
    tokenizer = train_tokenizer(CORPUS)
    tokenizer.add_tokens([f"~{i}" for i in range(len(tokenizer), vocab)])
    rng = random.Random(0)
    print("| answer tokens | whole answer us/token | incremental us/token | ratio |")
    print("|---|---|---|---|")
    for n in (128, 512, 1024):
        ids = [rng.randrange(vocab) for _ in range(n)]
        whole = per_token_us(WholeAnswer, tokenizer, ids)
        incremental = per_token_us(TextPieces, tokenizer, ids)
        print(f"| {n} | {whole:.1f} | {incremental:.1f} | {whole / incremental:.1f}x |")


if __name__ == "__main__":
    main()
