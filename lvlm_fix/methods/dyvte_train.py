"""Train DyVTE routers on a frozen model: `python -m lvlm_fix.methods.dyvte_train --model DIR`.

For each batch one exit layer e is drawn. Two teacher-forced branches run on prompt + answer:
the full model, and the model with every image token dropped after layer e (the same prune
hook point inference uses; dropping image keys equals masking them for the text rows). A
sample is labelled "exit" iff the branches agree on > 99 % of the answer argmaxes and the exit
branch's cross-entropy is < 1.03x the full one. Router e (fed the detached layer-e prompt
states, as at inference) learns that label with 2-class cross-entropy; the model stays frozen.

Data (`--data`): the gym's training mix (scenes + their first question, the default), or plain
shape images with template questions; answers are the frozen model's own greedy answers
(self-distillation).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from lvlm_fix.decoding import image_kwargs
from lvlm_fix.hooks import ForwardContext, forward_context
from lvlm_fix.lvlm import LVLM
from lvlm_fix.methods.base import RowState
from lvlm_fix.methods.dyvte import ROUTER_FILE, router_input, router_logits
from lvlm_fix.model import encode_rows, render_prompt
from lvlm_fix.params import GenerationParams
from lvlm_fix.plan import compile_plan

COLORS = {
    "red": (200, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square")
QUESTIONS = (
    "what color is the {shape}?",
    "is there a {shape} in the image?",
    "describe this image.",
    "what shape is in the picture?",
)


def generated_samples(n: int, size: int, seed: int) -> list[tuple[str, Image.Image]]:
    """n (question, image) pairs: one coloured shape on a plain background."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        shape, color = rng.choice(SHAPES), COLORS[rng.choice(list(COLORS))]
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        box = (x0, y0, x0 + size // 3, y0 + size // 3)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
        samples.append((rng.choice(QUESTIONS).format(shape=rng.choice(SHAPES)), image))
    return samples


def gym_samples(n: int, seed: int) -> list[tuple[str, Image.Image]]:
    """The first turn of n gym training conversations, with their rendered scenes."""
    from lvlm_fix.gym.data import category_frequencies, make_example
    from lvlm_fix.gym.world import render

    popular = category_frequencies(seed)
    examples = [make_example(seed, i, popular) for i in range(n)]
    return [(example.turns[0][0], render(example.scene)) for example in examples]


@dataclass(frozen=True)
class _ForcedExit:
    """Prune hook of the exit branch: drop every image token at the input of `layer`."""

    layer: int

    def select(self, layer: int, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if layer != self.layer:
            return None
        return ~ctx.layout.at_layer(layer - 1).image_mask


def answer_batch(lvlm: LVLM, samples: list[tuple[str, Image.Image]], answer_tokens: int):
    """Prompt batch (left padded) + the model's greedy answers appended on the right.

    Returns (batch, answers long [R, A], real bool [R, A]) or None when no sample answered.
    """
    params = GenerationParams(max_new_tokens=answer_tokens)
    answers = [g.token_ids for g in lvlm.generate(samples, params=params)]
    kept = [(s, a) for s, a in zip(samples, answers, strict=True) if a]
    if not kept:
        return None
    prompts = [render_prompt(lvlm.processor, q, 1) for (q, _), _ in kept]
    images = [[image] for (_, image), _ in kept]
    batch = encode_rows(lvlm.processor, lvlm.info.image_token_id, prompts, images, lvlm.device)
    width = max(len(a) for _, a in kept)
    answer = torch.zeros(len(kept), width, dtype=torch.long, device=lvlm.device)
    real = torch.zeros(len(kept), width, dtype=torch.bool, device=lvlm.device)
    for row, (_, ids) in enumerate(kept):
        answer[row, : len(ids)] = torch.tensor(ids)
        real[row, : len(ids)] = True
    layout = replace(
        batch.layout, image_mask=torch.nn.functional.pad(batch.layout.image_mask, (0, width))
    )
    batch = replace(
        batch,
        input_ids=torch.cat([batch.input_ids, answer], 1),
        attention_mask=torch.cat([batch.attention_mask, real.long()], 1),
        layout=layout,
    )
    return batch, answer, real


def teacher_forced(lvlm: LVLM, batch, answer_len: int, exit_after: int | None):
    """Logits [R, A, V] (fp32) predicting the last A columns, and the hidden states (full run).

    exit_after=e: every image token leaves after layer e (the exit branch).
    """
    plan = compile_plan([], lvlm.info, GenerationParams())
    if exit_after is not None:
        plan = replace(plan, prune_hooks=(_ForcedExit(exit_after + 1),))
    state = RowState.start((), batch.input_ids.shape[0], lvlm.device)
    ctx = ForwardContext(plan, state, batch.layout, "prefill", lvlm.info.num_layers)
    with forward_context(ctx), torch.no_grad():
        out = lvlm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            pixel_values=batch.pixel_values,
            output_hidden_states=exit_after is None,
            **image_kwargs(lvlm.model, batch),
        )
    return out.logits[:, -answer_len - 1 : -1].float(), out.hidden_states


def exit_labels(
    full: torch.Tensor, exited: torch.Tensor, answer: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """Per sample: argmax agreement > 0.99 and CE(exit) < 1.03 CE(full) -> 1 (exit), else 0."""
    count = real.sum(-1)
    agree = ((full.argmax(-1) == exited.argmax(-1)) & real).sum(-1) / count
    ce = torch.nn.functional.cross_entropy
    ce_full = (ce(full.transpose(1, 2), answer, reduction="none") * real).sum(-1) / count
    ce_exit = (ce(exited.transpose(1, 2), answer, reduction="none") * real).sum(-1) / count
    return ((agree > 0.99) & (ce_exit < 1.03 * ce_full)).long()


def train_step(
    lvlm, routers, optimizer, batch, answer, real, exit_after: int
) -> tuple[float, float]:
    """One optimiser step of router `exit_after`; returns (loss, fraction labelled exit)."""
    width = answer.shape[1]
    full, hidden = teacher_forced(lvlm, batch, width, None)
    exited, _ = teacher_forced(lvlm, batch, width, exit_after)
    labels = exit_labels(full, exited, answer, real)
    prompt = batch.input_ids.shape[1] - width
    states = hidden[exit_after + 1][:, :prompt]  # output of layer e over the prompt, detached
    columns = torch.arange(prompt, device=states.device)[None]
    real_prompt = columns >= batch.layout.key_start[:, None]
    last = torch.full((states.shape[0],), prompt - 1, device=states.device)
    x = router_input(states, batch.layout.image_mask[:, :prompt], real_prompt, last)
    w1, w2 = routers
    logits = router_logits(x, w1[exit_after], w2[exit_after])
    loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), labels.float().mean().item()


def cosine_schedule(steps: int, warmup: float):
    """The reference's learning-rate factor per step: linear warmup over `warmup` of the steps,
    then cosine decay to 0 (transformers' get_cosine_schedule_with_warmup)."""
    warm = max(1, int(warmup * steps + 0.999)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train(
    lvlm: LVLM, samples, *, width: int, epochs: int, batch_size: int, lr: float, seed: int,
    schedule: str = "cosine", warmup: float = 0.03, every_layer: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Routers w1 [L, width, 2D], w2 [L, 2, width] (xavier init) trained on `samples`.

    Each batch trains the router of one exit layer drawn at random, as the reference does;
    `every_layer` trains every router on every batch (one exit branch per layer)."""
    info = lvlm.info
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.empty(info.num_layers, width, 2 * info.hidden_size)
    w2 = torch.empty(info.num_layers, 2, width)
    for w in (*w1, *w2):
        torch.nn.init.xavier_uniform_(w, generator=generator)
    w1, w2 = w1.to(lvlm.device).requires_grad_(), w2.to(lvlm.device).requires_grad_()
    optimizer = torch.optim.AdamW([w1, w2], lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(samples) // batch_size)
    factor = cosine_schedule(steps, warmup) if schedule == "cosine" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = rng.sample(samples, len(samples))
        for start in range(0, len(order), batch_size):
            built = answer_batch(lvlm, order[start : start + batch_size], answer_tokens=8)
            # an exit after the last layer is moot
            layers = range(info.num_layers - 1)
            exits = list(layers) if every_layer else [rng.randrange(info.num_layers - 1)]
            for exit_after in exits if built is not None else ():
                loss, rate = train_step(lvlm, (w1, w2), optimizer, *built, exit_after)
                print(
                    f"epoch {epoch} step {start // batch_size}: layer {exit_after} "
                    f"loss {loss:.4f} exit-rate {rate:.2f}",
                    flush=True,
                )
            scheduler.step()
    return w1.detach().cpu(), w2.detach().cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (frozen)")
    parser.add_argument("--out", help=f"router file (default: MODEL/{ROUTER_FILE})")
    parser.add_argument("--samples", type=int, default=256, help="generated training samples")
    parser.add_argument("--data", choices=("gym", "shapes"), default="gym", help="training images")
    parser.add_argument("--width", type=int, default=2048, help="router hidden width")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-5)
    parser.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine",
        help="learning rate: the reference's cosine decay after warmup, or constant",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=0.03, help="warmup share of the steps")
    parser.add_argument(
        "--every-layer", action="store_true",
        help="train every router on every batch (the reference draws one exit layer a batch)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    lvlm = LVLM.from_pretrained(args.model, device=args.device)
    processor = lvlm.processor.image_processor
    sizes = getattr(processor, "crop_size", None) or processor.size
    size = sizes.get("height") or sizes.get("shortest_edge") or 336
    if args.data == "gym":
        samples = gym_samples(args.samples, args.seed)
    else:
        samples = generated_samples(args.samples, size, args.seed)
    w1, w2 = train(
        lvlm,
        samples,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        schedule=args.schedule,
        warmup=args.warmup,
        every_layer=args.every_layer,
    )
    out = Path(args.out) if args.out else Path(args.model) / ROUTER_FILE
    save_file({"w1": w1.contiguous(), "w2": w2.contiguous()}, str(out))
    print(f"saved routers to {out}")


if __name__ == "__main__":
    main()
