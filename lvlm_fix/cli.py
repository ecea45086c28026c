"""Command line: `lvlm-fix caption IMAGE`, `vqa IMAGE QUESTION`, `serve` and `eval`.

Interventions are given as `--intervention NAME[:key=value,...]`, repeatable, e.g.
`--intervention vhr:alpha=2 --intervention ritual`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

CAPTION_PROMPT = "Please describe this image in detail."


def parse_intervention_arg(text: str) -> dict[str, Any]:
    """`vhr:alpha=2,layers=last` -> {"name": "vhr", "alpha": 2, "layers": "last"} (JSON values)."""
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected key=value in {text!r}, got {item!r}")
        try:
            spec[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            spec[key.strip()] = raw
    return spec


def parse_device_map(text: str) -> str | dict[str, Any]:
    """`--device-map auto` (balanced, sequential, cuda:1, ...) or a JSON object of module name
    -> device, passed to transformers' `from_pretrained` as `device_map`."""
    text = text.strip()
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--device-map: not a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--device-map: expected a JSON object")
    return value


DEVICE_MAP_HELP = (
    "instead of --device: transformers' device_map, e.g. auto or balanced to split a model too "
    "large for one GPU over every visible GPU (needs accelerate), or a JSON object"
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint path or id (default: bundled)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--device-map", default=None, type=parse_device_map, help=DEVICE_MAP_HELP)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights' dtype (default: the checkpoint's)",
    )
    parser.add_argument(
        "--intervention",
        action="append",
        default=[],
        type=parse_intervention_arg,
        metavar="NAME[:k=v,...]",
        help="an intervention to apply (repeatable)",
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _generate(args: argparse.Namespace, question: str) -> int:
    from PIL import Image, UnidentifiedImageError

    from lvlm_fix import LVLM, GenerationParams, Sample
    from lvlm_fix.model import torch_dtype

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        print(f"error: cannot read image {args.image!r}: {error}", file=sys.stderr)
        return 2
    try:
        params = GenerationParams(
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        lvlm = LVLM.from_pretrained(args.model, device=args.device, dtype=torch_dtype(args.dtype),
                                    device_map=args.device_map)  # fmt: skip
        lvlm.plan(args.intervention, params)  # fail fast on bad interventions
        [out] = lvlm.generate([Sample(question, (image,))], args.intervention, params)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lvlm-fix", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="describe an image")
    caption.add_argument("image")
    caption.add_argument("--prompt", default=CAPTION_PROMPT)
    add_model_args(caption)
    add_generation_args(caption)

    vqa = commands.add_parser("vqa", help="answer a question about an image")
    vqa.add_argument("image")
    vqa.add_argument("question")
    add_model_args(vqa)
    add_generation_args(vqa)

    serve = commands.add_parser("serve", help="serve the REST API")
    add_model_args(serve)
    from lvlm_fix.service.launch import add_serve_args

    add_serve_args(serve)

    evaluate = commands.add_parser("eval", help="run POPE or CHAIR")
    from lvlm_fix.evals.cli import add_eval_args

    add_eval_args(evaluate)

    args = parser.parse_args(argv)
    if args.command == "caption":
        return _generate(args, args.prompt)
    if args.command == "vqa":
        return _generate(args, args.question)
    if args.command == "serve":
        from lvlm_fix.service.launch import serve_main

        return serve_main(args)
    from lvlm_fix.evals.cli import eval_main

    return eval_main(args)


if __name__ == "__main__":
    sys.exit(main())
