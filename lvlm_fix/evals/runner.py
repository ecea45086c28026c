"""Run a benchmark for several method rows (intervention sets) in one invocation.

out_dir/
    subset.json        which samples (and generation settings) this directory is for
    predictions.jsonl  one line per (method row, sample), appended as each sample finishes (so
                       in the order they finish, not the task's)
    metrics.json       versions, seeds, settings, per-method metrics, wall time and tokens/s,
                       and each row's differences to the baseline with paired bootstrap
                       intervals (evals/bootstrap.py)
    report.md/.png     the comparison table and plot (evals/report.py)

Resuming: lines already in predictions.jsonl are kept and their samples skipped, so a killed run
picks up where it stopped. Every sample gets its own seed, derived from the global seed and the
sample's key, and the workers' engines are batch-invariant (evals/pool.py), so results do not
depend on what decodes beside them, sharding or what was already done.

A method row's pending samples are fed to the model's engine as one queue, at most `batch_size`
in flight per model (each holds its image), and the engine batches them continuously; rows run
one after another, so each row's wall time and tokens/s are its own.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lvlm_fix.evals.bootstrap import DEFAULT_RESAMPLES, LEVEL, SampleSet, compare_rows
from lvlm_fix.evals.pool import ModelSpec, WorkUnit, make_pool
from lvlm_fix.evals.report import MethodRow, write_report
from lvlm_fix.methods import parse_intervention
from lvlm_fix.methods.base import config_hash
from lvlm_fix.params import GenerationParams

BASELINE = "baseline"


@dataclass(frozen=True)
class MethodSet:
    """One row of the comparison: a name and the interventions applied together."""

    name: str
    interventions: tuple[dict[str, Any], ...] = ()

    @property
    def config_id(self) -> str:
        """The plan's config_id (same hash as Plan.config_id), without loading a model."""
        return config_hash([parse_intervention(dict(spec)) for spec in self.interventions])

    @property
    def specs(self) -> list[dict[str, Any]]:
        """Full specs, defaults filled in: what the predictions and metrics record."""
        return [parse_intervention(dict(spec)).spec() for spec in self.interventions]


@dataclass(frozen=True)
class EvalItem:
    """One benchmark sample. `key` is unique within the benchmark, e.g. "gym_pope_random/7"."""

    key: str
    prompt: str
    image: str  # path of the image file
    fields: dict[str, Any] = field(default_factory=dict)  # recorded on the prediction line


@dataclass(frozen=True)
class TaskScore:
    """A method row scored: what metrics.json, the report and the bootstrap need."""

    details: dict[str, Any]  # metrics.json's "metrics" entry of the row
    metrics: dict[str, float]  # flat MethodRow.metrics
    samples: list[SampleSet]  # per-sample counts, in task.items order, for the intervals


class Task(Protocol):
    """What a benchmark (pope_task.py, chair_task.py) provides to the runner."""

    benchmark: str
    items: list[EvalItem]

    def settings(self) -> dict[str, Any]: ...

    def record(self, item: EvalItem, answer: str) -> dict[str, Any]: ...

    def score(self, lines: list[dict[str, Any]]) -> TaskScore: ...


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    out_dir: Path
    max_new_tokens: int
    batch_size: int = 64  # requests in flight per model at most
    # Sample (temperature 1, no top-k/top-p cut, per-sample seeds) instead of greedy: how the
    # RITUAL, VCD and M3ID reference code decodes, baseline included.
    do_sample: bool = False
    seed: int = 0
    use_ray: bool = False
    workers: int = 1
    address: str | None = None
    progress: bool = True
    bootstrap: int = DEFAULT_RESAMPLES  # resamples per interval; 0 = no intervals


def sample_seed(seed: int, key: str) -> int:
    """Per-sample seed from (global seed, sample key): batch- and shard-independent."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def subset_order(key: str) -> str:
    """Sort key that picks a deterministic, file-order-independent `--limit` subset."""
    return hashlib.sha256(f"lvlm_fix.subset/{key}".encode()).hexdigest()


def load_subset_keys(path: str | Path) -> frozenset[str]:
    """The sample keys of a subset.json written by an earlier run (to evaluate the same set)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"subset file {str(path)!r} does not exist")
    keys = json.loads(path.read_text(encoding="utf-8")).get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{path}: no 'keys' list (is it a subset.json from lvlm-fix eval?)")
    return frozenset(map(str, keys))


def check_keys(keys: frozenset[str] | None, items: Sequence[EvalItem]) -> None:
    """Every key of a requested subset must be in the data."""
    if keys is None:
        return
    missing = sorted(keys - {item.key for item in items})
    if missing:
        raise ValueError(f"{len(missing)} subset keys are not in the data (first {missing[:3]})")


def check_methods(methods: Sequence[MethodSet]) -> None:
    """Unique names and known interventions (ValueError names the problem)."""
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method names must be unique; repeated: {duplicates}")
    for method in methods:
        try:
            method.config_id  # noqa: B018  (parses every intervention)
        except ValueError as error:
            raise ValueError(f"method {method.name!r}: {error}") from None


def _write_subset(task: Task, config: RunConfig) -> None:
    """Write subset.json, or check that the one there describes the same run."""
    subset = {
        "benchmark": task.benchmark,
        "model": config.model.path,
        "seed": config.seed,
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "settings": task.settings(),
        "keys": [item.key for item in task.items],
    }
    path = config.out_dir / "subset.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in subset if old.get(k) != subset[k])
        if changed:
            raise ValueError(
                f"{path} describes another run (differs in {changed}); use a new --out directory"
            )
        return
    path.write_text(json.dumps(subset, indent=1) + "\n", encoding="utf-8")


@dataclass
class MethodRun:
    """What one method row cost in this invocation."""

    generated: int = 0  # samples generated now (resumed ones excluded)
    tokens: int = 0
    wall_s: float = 0.0


def _line(task: Task, item: EvalItem, method: MethodSet, gen, seed: int, model: str) -> dict:
    return {
        "key": item.key,
        **item.fields,
        "answer": gen.text,
        **task.record(item, gen.text),
        "method": method.name,
        "config_id": gen.config_id,
        "interventions": method.specs,
        "seed": seed,
        "model": model,
        "n_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        **({"views": gen.views} if gen.views else {}),  # e.g. RITUAL's transform and its params
    }


def _run_method(task, method, pool, store, config, params) -> MethodRun:
    """Generate every sample of `task` that `store` lacks for `method`, storing each line as its
    sample finishes."""
    from tqdm import tqdm

    pool.check(method.specs, params)  # fail before any work on a bad plan
    todo = [item for item in task.items if not store.has(method.name, item.key)]
    seeds = {item.key: sample_seed(config.seed, item.key) for item in todo}
    units = [WorkUnit(item.prompt, item.image, seeds[item.key]) for item in todo]
    run, start = MethodRun(), time.perf_counter()
    model = config.model.path or "bundled"
    bar = tqdm(
        total=len(task.items),
        initial=len(task.items) - len(todo),
        desc=f"{task.benchmark}:{method.name}",
        unit="sample",
        disable=not config.progress,
    )
    with bar:
        for index, generation in pool.run(units, method.specs, params, config.batch_size):
            item = todo[index]
            line = _line(task, item, method, generation, seeds[item.key], model)
            store.append([line])
            run.generated += 1
            run.tokens += line["n_tokens"]
            run.wall_s = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(tok_s=f"{run.tokens / max(run.wall_s, 1e-9):.1f}")
    return run


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    import lvlm_fix

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {**versions, "lvlm_fix": lvlm_fix.__version__}


def _check_resumable(store, methods: Sequence[MethodSet]) -> None:
    """A method name already in predictions.jsonl must mean the same interventions."""
    for method in methods:
        ids = {line["config_id"] for line in store.for_method(method.name)}
        if ids - {method.config_id}:
            raise ValueError(
                f"predictions.jsonl has method {method.name!r} with config_id {sorted(ids)}, but "
                f"it is now {method.config_id}; rename the method or use a new --out directory"
            )


def _score_method(task: Task, method: MethodSet, store) -> TaskScore:
    lines = store.for_method(method.name)
    by_key = {line["key"]: line for line in lines}
    ordered = [by_key[item.key] for item in task.items if item.key in by_key]
    if len(ordered) != len(task.items):
        raise RuntimeError(f"method {method.name!r}: {len(task.items) - len(ordered)} missing")
    return task.score(ordered)


def run_eval(task: Task, methods: Sequence[MethodSet], config: RunConfig) -> dict[str, Any]:
    """Generate what is missing for every method row, then score and write the outputs.

    Returns the metrics.json content; its "runs" entry says how many samples each row generated
    in this invocation.
    """
    from lvlm_fix.evals.store import PredictionStore

    check_methods(methods)
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {config.bootstrap}")
    if not task.items:
        raise ValueError("no samples to evaluate")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    _write_subset(task, config)
    store = PredictionStore(config.out_dir / "predictions.jsonl")
    _check_resumable(store, methods)
    params = GenerationParams(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample)
    runs: dict[str, MethodRun] = {}
    start = time.perf_counter()
    pool = make_pool(config.model, config.use_ray, config.workers, config.address)
    try:
        for method in methods:
            runs[method.name] = _run_method(task, method, pool, store, config, params)
    finally:
        pool.close()
    wall_s = time.perf_counter() - start
    return _write_outputs(task, methods, config, store, runs, wall_s)


def _deltas(scores: dict[str, TaskScore], config: RunConfig) -> dict[str, dict]:
    """Each row's Deltas against the baseline row (none without one or with --bootstrap 0)."""
    if BASELINE not in scores or config.bootstrap == 0:
        return {name: {} for name in scores}
    base, resamples, seed = scores[BASELINE].samples, config.bootstrap, config.seed
    return {
        name: {} if name == BASELINE else compare_rows(base, s.samples, resamples, seed)
        for name, s in scores.items()
    }


def _write_outputs(task, methods, config, store, runs, wall_s: float) -> dict[str, Any]:
    scores = {method.name: _score_method(task, method, store) for method in methods}
    deltas = _deltas(scores, config)
    rows, per_method = [], {}
    for method in methods:
        run, score = runs[method.name], scores[method.name]
        per_method[method.name] = {
            "config_id": method.config_id,
            "interventions": method.specs,
            "metrics": score.details,
            "vs_baseline": {
                key: {**d.model_dump(), "within_noise": d.within_noise}
                for key, d in deltas[method.name].items()
            },
            "generated_this_run": run.generated,
            "wall_s": round(run.wall_s, 3),
            "tokens_per_s": round(run.tokens / run.wall_s, 2) if run.wall_s > 0 else None,
        }
        rows.append(
            MethodRow(
                name=method.name,
                config_hash=method.config_id,
                metrics=score.metrics,
                deltas=deltas[method.name],
            )
        )
    metrics = {
        "benchmark": task.benchmark,
        "model": config.model.path or "bundled",
        "versions": library_versions(),
        "seed": config.seed,
        "seed_rule": "sha256(f'{seed}/{key}')[:4] little-endian, per sample",
        "settings": {
            **task.settings(),
            "max_new_tokens": config.max_new_tokens,
            "decoding": "sample" if config.do_sample else "greedy",
            "batch_size": config.batch_size,
            "device": config.model.device,
            "dtype": config.model.dtype,
            "ray": config.use_ray,
            "workers": config.workers if config.use_ray else 1,
        },
        "n_samples": len(task.items),
        "bootstrap": {
            "resamples": config.bootstrap,
            "seed": config.seed,  # sample set i of a row is resampled with seed + i
            "level": LEVEL,
            "paired": True,
            "unit": "POPE: questions of one split; CHAIR: images",
            "interval": "percentile",
        },
        "wall_s": round(wall_s, 3),  # this invocation, model loading included
        "methods": per_method,
    }
    path = config.out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    decoding = "sampled, temperature 1" if config.do_sample else "greedy"
    title = f"{task.benchmark.upper()} evaluation ({decoding})"
    write_report(rows, config.out_dir, title=title, resamples=config.bootstrap)
    return metrics
