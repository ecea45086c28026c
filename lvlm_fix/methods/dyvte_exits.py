"""Where DyVTE's routers exit on POPE questions, and whether they follow the training labels.

    python -m lvlm_fix.methods.dyvte_exits --model DIR --images IMAGES --data SPLIT.json ... \
        [--router FILE] [--limit 200] [--threshold 0.5]

Same questions (`--limit` subset) and prompts as `lvlm-fix eval pope`. The exit layer is read
from one unpruned forward: up to the layer where a router first fires, the DyVTE run's states
are the unpruned ones, so the first layer with p(exit) > threshold is where the method exits.
The labels are the trainer's (`dyvte_train.exit_labels` on the model's greedy answer), one per
candidate layer; "agree" counts questions whose router decision at that layer equals its label.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from lvlm_fix.evals.pope import PopeSettings
from lvlm_fix.evals.pope_task import build_pope_task
from lvlm_fix.lvlm import LVLM
from lvlm_fix.methods.dyvte import ROUTER_FILE, load_routers, router_input, router_logits
from lvlm_fix.methods.dyvte_train import answer_batch, exit_labels, teacher_forced


def split_exits(lvlm: LVLM, routers, samples, threshold: float, batch_size: int):
    """Per sample: exit layer (-1 = never) and, per layer, (router says exit, label)."""
    w1, w2 = routers
    layers = w1.shape[0] - 1  # an exit after the last layer is moot (the trainer skips it)
    exits, decisions, labels = [], [], []
    for start in range(0, len(samples), batch_size):
        built = answer_batch(lvlm, samples[start : start + batch_size], answer_tokens=8)
        assert built is not None and built[0].input_ids.shape[0] == len(
            samples[start : start + batch_size]
        ), "every POPE question gets an answer"
        batch, answer, real = built
        width = answer.shape[1]
        full, hidden = teacher_forced(lvlm, batch, width, None)
        prompt = batch.input_ids.shape[1] - width
        columns = torch.arange(prompt, device=full.device)[None]
        real_prompt = columns >= batch.layout.key_start[:, None]
        last = torch.full((batch.input_ids.shape[0],), prompt - 1, device=full.device)
        says, label = [], []
        for e in range(layers):
            image = batch.layout.image_mask[:, :prompt]
            x = router_input(hidden[e + 1][:, :prompt], image, real_prompt, last)
            p = router_logits(x, w1[e].to(x.device), w2[e].to(x.device)).softmax(-1)[:, 1]
            says.append(p > threshold)
            exited, _ = teacher_forced(lvlm, batch, width, e)
            label.append(exit_labels(full, exited, answer, real).bool())
        says, label = torch.stack(says, 1).cpu(), torch.stack(label, 1).cpu()  # [R, layers]
        first = torch.where(says.any(1), says.long().argmax(1), -1)
        exits += first.tolist()
        decisions.append(says)
        labels.append(label)
    return exits, torch.cat(decisions), torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--router", help=f"router file (default: MODEL/{ROUTER_FILE})")
    parser.add_argument("--images", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    lvlm = LVLM.from_pretrained(args.model, device=args.device)
    routers = load_routers(Path(args.router or Path(args.model) / ROUTER_FILE))
    task = build_pope_task(args.data, args.images, PopeSettings(), limit=args.limit)
    for split in task.splits:
        items = [item for item in task.items if item.fields["split"] == split]
        samples = [(item.prompt, Image.open(item.image).convert("RGB")) for item in items]
        exits, says, label = split_exits(lvlm, routers, samples, args.threshold, args.batch_size)
        n = len(exits)
        where = Counter(exits)
        layers = ", ".join(f"layer {k}: {where[k]}" for k in sorted(where) if k >= 0)
        print(
            f"{split}: {n} questions, exit on {n - where[-1]} ({100 * (n - where[-1]) / n:.1f}%)"
            f" [{layers or 'none'}]"
        )
        for e in range(says.shape[1]):
            agree = int((says[:, e] == label[:, e]).sum())
            print(
                f"  layer {e}: label exit {int(label[:, e].sum())}/{n}, router exit "
                f"{int(says[:, e].sum())}/{n}, agree {agree}/{n}"
            )


if __name__ == "__main__":
    main()
