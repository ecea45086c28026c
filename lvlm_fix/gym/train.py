"""Train the gym's tiny LLaVA from scratch: `python -m lvlm_fix.gym.train --out DIR`.

Reproducible from `--seed`: the tokenizer is trained on gym text of that seed, the weights are
initialised from it, and training example i is `make_example(seed, i)` whatever the number of
loader workers. The loss is the mean over examples of each example's mean answer-token loss,
so a conversation of two-token "Yes</s>" answers weighs as much as a 60-token caption.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, Dataset
from transformers import LlavaProcessor

from lvlm_fix.gym.data import (
    category_frequencies,
    corpus,
    make_example,
    train_segments,
)
from lvlm_fix.gym.model import GymModelConfig, build_model, build_processor
from lvlm_fix.gym.world import CANVAS, render
from lvlm_fix.tiny import train_tokenizer

VOCAB_SIZE = 640


class GymDataset(Dataset):
    """Example i of `seed`, rendered and tokenised exactly as `LlavaProcessor` would:
    input_ids, labels (-100 off the answers) and pixel_values. The conversation is tokenised
    piece by piece (every piece starts at a pre-token boundary, so the pieces give the whole
    text's tokens) to know which tokens are answers.

    The pixels are normalised here with the image processor's own mean/std (the image is already
    CANVAS x CANVAS, so its resize and crop are identities): the processor's per-call overhead
    would otherwise cost a third of the loader's CPU time. tests/test_gym.py pins the equality.
    """

    def __init__(self, seed: int, length: int, processor: LlavaProcessor, popular: dict) -> None:
        self.seed, self.length, self.processor, self.popular = seed, length, processor, popular
        image_processor = processor.image_processor
        self.mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        self.std = np.asarray(image_processor.image_std, dtype=np.float32)
        # What the processor expands <image> to: one token per patch ("default" drops CLS).
        self.image_tokens = "<image>" * (CANVAS // processor.patch_size) ** 2

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = make_example(self.seed, index, self.popular)
        tok = self.processor.tokenizer
        ids, labels = [tok.bos_token_id], [-100]
        for text, is_answer in train_segments(ex.turns):
            piece = tok(text.replace("<image>", self.image_tokens), add_special_tokens=False)
            ids += piece.input_ids
            labels += piece.input_ids if is_answer else [-100] * len(piece.input_ids)
        pixels = (np.asarray(render(ex.scene), dtype=np.float32) / 255.0 - self.mean) / self.std
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),  # (3, H, W)
        }


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: positions 0..L-1 of every row are its real tokens, as at inference."""
    length = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
    pixels = torch.stack([b["pixel_values"] for b in batch])  # (B, 3, 96, 96)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, L, V), labels (B, L): mean over examples of the mean next-token loss."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counted = (labels != -100).float()  # (B, L-1)
    return ((tok * counted).sum(1) / counted.sum(1).clamp(min=1)).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; not norms or biases
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=torch.cuda.is_available())


def _loader(data: GymDataset, args: argparse.Namespace, pad_id: int) -> DataLoader:
    """Batches in index order; worker count changes speed, never the data."""
    return DataLoader(
        data,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=lambda b: collate(b, pad_id),
        pin_memory=args.device == "cuda",
        prefetch_factor=4 if args.workers else None,
    )


def _save(model: torch.nn.Module, processor: LlavaProcessor, out: Path, info: dict) -> None:
    # fp16 on disk halves the file; the config keeps float32, so from_pretrained computes in fp32.
    half = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=half)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=1))


def train(args: argparse.Namespace) -> dict:
    """Train, save to `args.out`, return what training.json records."""
    start = time.time()
    torch.manual_seed(args.seed)
    popular = category_frequencies(args.seed)
    tokenizer = train_tokenizer(corpus(args.seed, 4000, popular), vocab_size=VOCAB_SIZE)
    processor = build_processor(tokenizer, GymModelConfig())
    model = build_model(tokenizer, GymModelConfig()).to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M", flush=True)
    data = GymDataset(args.seed, args.steps * args.batch_size, processor, popular)
    opt = _optimizer(model, args.lr, args.weight_decay)
    history, t0, waited, t_ready, done = [], time.time(), 0.0, time.time(), args.steps
    for step, batch in enumerate(_loader(data, args, tokenizer.pad_token_id)):
        waited += time.time() - t_ready  # time the GPU sat waiting for the loader
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            logits = model(**batch).logits  # (B, L, V)
        loss = example_mean_loss(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t0
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "steps_per_s": round((step + 1) / elapsed, 2),
                            "loader_wait_share": round(waited / elapsed, 3)})  # fmt: skip
            print(json.dumps(history[-1]), flush=True)
        if args.max_seconds and time.time() - t0 > args.max_seconds and step < args.steps - 1:
            done = step + 1  # a safety stop mid-schedule; training.json (and the card) say so
            break
        t_ready = time.time()
    info = {
        "command": "python -m lvlm_fix.gym.train " + " ".join(args.argv),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "steps_done": done,
        "stopped_early_by_max_seconds": done < args.steps,
        "examples_seen": done * args.batch_size,
        "parameters": n_params,
        "train_seconds": round(time.time() - t0, 1),
        "total_seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "final_loss": history[-1]["loss"],
        "loss_curve": history,
    }
    _save(model, processor, Path(args.out), info)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(12, max(0, (os.cpu_count() or 1) - 4)))
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=0, help="safety stop; 0 = none")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be positive")
    args.argv = argv if argv is not None else sys.argv[1:]
    info = train(args)
    print(json.dumps({k: v for k, v in info.items() if k != "loss_curve"}))


if __name__ == "__main__":
    main()
