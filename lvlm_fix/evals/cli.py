"""`lvlm-fix eval {pope,chair}`: several method rows (intervention sets) in one run.

A method row is `--method NAME=SPEC[;SPEC...]`, each SPEC being one intervention as in
`--intervention` (`name[:key=value,...]`); the interventions of a row are applied together.
`--method SPEC` alone names the row after the spec. A "baseline" row (no interventions) always
comes first. Examples:

    lvlm-fix eval pope --data coco_pope_random.json --images val2014 --out runs/pope \\
        --method vhr=vhr:alpha=2 --method "var+vhr=var;vhr:alpha=2"
    lvlm-fix eval chair --instances instances_val2014.json --images val2014 --out runs/chair \\
        --limit 500 --method ritual
    lvlm-fix eval pope --protocol vlmevalkit --data POPE.tsv --images pope_images --out runs/vk

`--protocol lmms-eval|vlmevalkit` asks and scores as that toolkit does (evals/protocols.py);
`--parser` and `--prompt-suffix` choose among the official protocol's variants and are an error
with another protocol. Every row gets its difference to the baseline with a paired bootstrap
interval (`--bootstrap N` resamples, 0 = none).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvlm_fix.cli import (
    CAPTION_PROMPT,
    DEVICE_MAP_HELP,
    parse_device_map,
    parse_intervention_arg,
)
from lvlm_fix.evals.bootstrap import DEFAULT_RESAMPLES
from lvlm_fix.evals.pool import DTYPES, ModelSpec
from lvlm_fix.evals.pope import PARSERS, PROMPT_SUFFIXES
from lvlm_fix.evals.protocols import MAX_NEW_TOKENS, PROTOCOLS
from lvlm_fix.evals.runner import BASELINE, MethodSet, RunConfig

CHAIR_MAX_NEW_TOKENS = 64


def parse_method_arg(text: str) -> MethodSet:
    """`"var+vhr=var;vhr:alpha=2"` -> MethodSet("var+vhr", ({"name": "var"}, {...alpha 2})).

    Without `NAME=` (nothing before a first "=" that has no ":"), the row is named by the text.
    """
    head, eq, rest = text.partition("=")
    named = bool(eq) and ":" not in head and bool(head.strip())
    name, specs = (head.strip(), rest) if named else (text.strip(), text)
    parts = [part.strip() for part in specs.split(";") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"method {text!r} has no interventions")
    if name == BASELINE:
        raise argparse.ArgumentTypeError(f"{BASELINE!r} is the reserved no-intervention row")
    return MethodSet(name, tuple(parse_intervention_arg(part) for part in parts))


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lvlm-fix eval` (the parser comes empty)."""
    parser.add_argument("benchmark", choices=("pope", "chair"))
    parser.add_argument("--model", default=None, help="checkpoint path (default: bundled)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--device-map", default=None, type=parse_device_map, help=DEVICE_MAP_HELP)
    parser.add_argument("--out", required=True, type=Path, help="results folder (resumable)")
    parser.add_argument(
        "--images", required=True, type=Path, help="image folder (embedded images are written here)"
    )
    parser.add_argument(
        "--method",
        action="append",
        default=[],
        type=parse_method_arg,
        metavar="NAME=SPEC[;SPEC...]",
        help='a method row, SPEC = name[:k=v,...]; e.g. "var+vhr=var;vhr:alpha=2" (repeatable)',
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=RunConfig.batch_size,
        help="samples in flight per model at most; its engine batches them continuously",
    )
    parser.add_argument("--limit", type=int, default=None, help="N per POPE split / N images")
    parser.add_argument(
        "--subset", type=Path, default=None, help="reuse the samples of a subset.json"
    )
    parser.add_argument("--seed", type=int, default=0, help="global seed (per-sample seeds)")
    parser.add_argument(
        "--do-sample",
        action="store_true",
        help="sample (temperature 1, per-sample seeds) as the RITUAL/VCD/M3ID references do",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="POPE: official 16, lmms-eval 128, vlmevalkit 2048; CHAIR 64",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help="paired bootstrap resamples for the intervals vs baseline (0: none; seed: --seed)",
    )
    pope = parser.add_argument_group("POPE")
    pope.add_argument(
        "--data",
        action="append",
        default=[],
        type=Path,
        help="question file: POPE JSON/JSONL, VLMEvalKit POPE.tsv or an lmms-lab/POPE JSON export",
    )
    pope.add_argument(
        "--protocol",
        default="official",
        choices=PROTOCOLS,
        help="whose prompt, answer reading and metric definitions to use",
    )
    pope.add_argument(
        "--prompt-suffix", default=None, choices=list(PROMPT_SUFFIXES), help="official: one_word"
    )
    pope.add_argument("--parser", default=None, choices=list(PARSERS), help="official: official")
    chair = parser.add_argument_group("CHAIR")
    chair.add_argument("--instances", action="append", default=[], type=Path)
    chair.add_argument("--captions", action="append", default=[], type=Path)
    chair.add_argument("--synonyms", default=None, help="synonym file (default: bundled COCO)")
    chair.add_argument("--prompt", default=None, help=f"default: {CAPTION_PROMPT!r}")
    chair.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    chair.add_argument(
        "--drop-incomplete",
        default="auto",
        choices=("auto", "on", "off"),
        help="drop a last unfinished sentence before scoring (auto: on iff max-new-tokens <= 64)",
    )
    chair.add_argument("--compat", action="store_true", help="keep the reference CHAIR quirks")
    dist = parser.add_argument_group("distributed")
    dist.add_argument("--ray", action="store_true", help="shard over Ray actors")
    dist.add_argument("--workers", type=int, default=2, help="CPU actors (GPU: one per GPU)")
    dist.add_argument("--address", default=None, help="join an existing Ray cluster")


def _chair_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise ValueError(f"prompt file {str(args.prompt_file)!r} does not exist")
        return args.prompt_file.read_text(encoding="utf-8").strip()
    return args.prompt if args.prompt is not None else CAPTION_PROMPT


def _pope_settings(args: argparse.Namespace):
    """PopeSettings; --parser/--prompt-suffix only go with the official protocol."""
    from lvlm_fix.evals.pope import PopeSettings

    official = {"prompt_suffix": args.prompt_suffix, "parser": args.parser}
    given = {name: value for name, value in official.items() if value is not None}
    if args.protocol != "official" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(
            f"{flags}: options of --protocol official; --protocol {args.protocol} fixes its own "
            "prompt and answer reading"
        )
    return PopeSettings(protocol=args.protocol, **given)


def _default_max_new_tokens(args: argparse.Namespace) -> int:
    if args.benchmark == "pope":
        return MAX_NEW_TOKENS[args.protocol]
    return CHAIR_MAX_NEW_TOKENS


def build_task(args: argparse.Namespace, max_new_tokens: int):
    """The PopeTask or ChairTask the arguments describe (ValueError on bad input)."""
    from lvlm_fix.evals.runner import load_subset_keys

    keys = None if args.subset is None else load_subset_keys(args.subset)
    if args.benchmark == "pope":
        from lvlm_fix.evals.pope_task import build_pope_task

        return build_pope_task(args.data, args.images, _pope_settings(args), args.limit, keys)
    from lvlm_fix.evals.chair import ChairConfig
    from lvlm_fix.evals.chair_task import build_chair_task

    drop = {"on": True, "off": False, "auto": max_new_tokens <= 64}[args.drop_incomplete]
    config = ChairConfig(
        compat=args.compat, drop_incomplete_sentence=drop, synonyms_path=args.synonyms
    )
    prompt = _chair_prompt(args)
    return build_chair_task(
        args.instances, args.images, prompt, config, args.captions, args.limit, keys
    )


def eval_main(args: argparse.Namespace) -> int:
    """Run `lvlm-fix eval`; 0 on success, 2 on bad input (with a message on stderr)."""
    from lvlm_fix.evals.runner import run_eval

    max_new_tokens = args.max_new_tokens or _default_max_new_tokens(args)
    try:
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.model is not None and not Path(args.model).exists():
            raise ValueError(f"model path {args.model!r} does not exist")
        task = build_task(args, max_new_tokens)
        config = RunConfig(
            model=ModelSpec(args.model, args.device, args.dtype, args.device_map),
            out_dir=args.out,
            max_new_tokens=max_new_tokens,
            do_sample=args.do_sample,
            batch_size=args.batch_size,
            seed=args.seed,
            use_ray=args.ray,
            workers=args.workers,
            address=args.address,
            progress=not args.no_progress,
            bootstrap=args.bootstrap,
        )
        methods = [MethodSet(BASELINE), *args.method]
        metrics = run_eval(task, methods, config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, row in metrics["methods"].items():
        print(f"{name} [{row['config_id']}]: generated {row['generated_this_run']}, "
              f"{row['tokens_per_s']} tok/s")  # fmt: skip
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lvlm_fix.evals.cli pope ...`: the same as `lvlm-fix eval pope ...`."""
    parser = argparse.ArgumentParser(prog="lvlm-fix eval", description=__doc__.splitlines()[0])
    add_eval_args(parser)
    return eval_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
