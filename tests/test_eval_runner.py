"""Evaluation end to end on a tiny random LLaVA: POPE and CHAIR, resume, Ray sharding, and the
worker that feeds a model's engine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from conftest import make_image

from lvlm_fix.evals.cli import add_eval_args, eval_main, parse_method_arg
from lvlm_fix.evals.pool import EvalWorker, ModelSpec, WorkUnit
from lvlm_fix.evals.pope import parse_official
from lvlm_fix.evals.runner import sample_seed
from lvlm_fix.params import GenerationParams
from lvlm_fix.tiny import build_tiny

COLORS = [(200, 20, 20), (20, 160, 40), (30, 30, 200), (220, 200, 30), (120, 40, 160)]
POPE_OBJECTS = ["cup", "car", "boat", "bird"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(build_tiny("llava", tmp_path_factory.mktemp("model") / "llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two POPE splits and a CHAIR set (COCO instances + captions) over five images."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    for i, color in enumerate(COLORS):
        make_image(color, (32 + 4 * i, 32)).save(root / "images" / f"img{i}.png")
    for split, offset in (("random", 0), ("popular", 1)):
        lines = []
        for q in range(10):
            obj = POPE_OBJECTS[(q + offset) % 4]
            text, label = f"Is there a {obj} in the image?", "yes" if q % 2 else "no"
            rec = {"question_id": q + 1, "image": f"img{q % 5}.png", "text": text, "label": label}
            lines.append(json.dumps(rec) + ("\r\n" if split == "popular" else "\n"))
        (root / f"tiny_pope_{split}.json").write_text("".join(lines))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(["cup", "car", "boat", "bird"])]
    images = [{"id": 10 + i, "file_name": f"img{i}.png"} for i in range(5)]
    anns = [{"image_id": 10 + i, "category_id": 1 + i % 4} for i in range(5)]
    (root / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    caps = [{"image_id": 10, "caption": "A red car parked outside."}]
    (root / "captions.json").write_text(json.dumps({"annotations": caps}))
    return root


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    return eval_main(parser.parse_args(argv))


def pope_argv(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["pope", "--model", model, "--images", str(data / "images"), "--out", str(out),
            "--data", str(data / "tiny_pope_random.json"),
            "--data", str(data / "tiny_pope_popular.json"), "--no-progress", *extra]  # fmt: skip


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pope_run(model_path, data, tmp_path_factory) -> Path:
    """POPE with a baseline and one method row, 6 questions per split, 4 in flight."""
    out = tmp_path_factory.mktemp("pope")
    argv = pope_argv(model_path, data, out, "--limit", "6", "--batch-size", "4",
                     "--max-new-tokens", "6", "--seed", "3",
                     "--method", "contrast=pai_cfg:gamma=2.5")  # fmt: skip
    assert run_cli(argv) == 0
    return out


def test_pope_predictions_and_metrics(pope_run, model_path):
    lines = read_lines(pope_run / "predictions.jsonl")
    assert len(lines) == 2 * 2 * 6  # rows x splits x limit
    assert {ln["method"] for ln in lines} == {"baseline", "contrast"}
    subset = json.loads((pope_run / "subset.json").read_text())
    baseline = [ln["key"] for ln in lines[:12]]  # rows run in turn, samples in the order done
    assert len(subset["keys"]) == 12 and sorted(subset["keys"]) == sorted(baseline)
    for ln in lines:
        assert ln["seed"] == sample_seed(3, ln["key"])
        assert ln["key"] == f"{ln['split']}/{ln['question_id']}"
        assert ln["pred"] == parse_official(ln["answer"])
        assert ln["model"] == model_path and ln["n_tokens"] <= 6
    contrast = [ln for ln in lines if ln["method"] == "contrast"]
    assert contrast[0]["interventions"] == [
        {"name": "pai_cfg", "gamma": 2.5, "beta": 0.1, "text_only": "drop_image_tokens"}
    ]
    assert len({ln["config_id"] for ln in contrast}) == 1 != len({ln["config_id"] for ln in lines})
    metrics = json.loads((pope_run / "metrics.json").read_text())
    assert set(metrics["versions"]) == {"torch", "transformers", "lvlm_fix"}
    settings = metrics["settings"]
    assert settings["max_new_tokens"] == 6 and settings["parser"] == "official"
    for name, row in metrics["methods"].items():
        assert row["generated_this_run"] == 12 and row["tokens_per_s"] > 0
        for split in ("tiny_pope_random", "tiny_pope_popular"):
            mine = [ln for ln in lines if ln["method"] == name and ln["split"] == split]
            tp = sum(ln["label"] == 1 and ln["pred"] == 1 for ln in mine)
            fp = sum(ln["label"] == 0 and ln["pred"] == 1 for ln in mine)
            tn = sum(ln["label"] == 0 and ln["pred"] == 0 for ln in mine)
            got = row["metrics"][split]
            assert (got["tp"], got["fp"], got["tn"], got["n"]) == (tp, fp, tn, 6)
            assert got["acc"] == pytest.approx((tp + tn) / 6)
            assert got["yes_ratio"] == pytest.approx((tp + fp) / 6)
    assert metrics["bootstrap"]["resamples"] == 1000 and metrics["bootstrap"]["seed"] == 3
    assert metrics["methods"]["baseline"]["vs_baseline"] == {}
    diffs = metrics["methods"]["contrast"]["vs_baseline"]
    assert set(diffs) == {f"pope/{s}/{k}" for s in ("tiny_pope_random", "tiny_pope_popular")
                          for k in ("acc", "f1")}  # fmt: skip
    for key, d in diffs.items():
        _, split, name = key.split("/")
        got = metrics["methods"]["contrast"]["metrics"][split][name]
        base = metrics["methods"]["baseline"]["metrics"][split][name]
        assert d["diff"] == pytest.approx(got - base) and d["lo"] <= d["diff"] <= d["hi"]
        assert d["within_noise"] == (d["lo"] <= 0 <= d["hi"])
    report = (pope_run / "report.md").read_text()
    assert "tiny_pope_random" in report and "| contrast |" in report
    assert "ΔAcc [95% CI]" in report and "paired bootstrap 95% interval" in report
    assert (pope_run / "report.png").stat().st_size > 0


def test_pope_resume_computes_only_missing(pope_run, model_path, data, tmp_path):
    """Kill simulated by truncating the file mid-line: the rerun keeps the finished lines."""
    full = (pope_run / "predictions.jsonl").read_text().splitlines(keepends=True)
    for name in ("subset.json",):
        (tmp_path / name).write_text((pope_run / name).read_text())
    kept = full[:7]
    (tmp_path / "predictions.jsonl").write_text("".join(kept) + full[7][:20])  # partial line
    argv = pope_argv(model_path, data, tmp_path, "--limit", "6", "--batch-size", "5",
                     "--max-new-tokens", "6", "--seed", "3",
                     "--method", "contrast=pai_cfg:gamma=2.5")  # fmt: skip
    assert run_cli(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["methods"]["baseline"]["generated_this_run"] == 12 - 7
    assert metrics["methods"]["contrast"]["generated_this_run"] == 12
    resumed = (tmp_path / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert resumed[:7] == kept  # finished lines untouched
    # Same answers as the uninterrupted run, despite other batch-mates (per-sample seeds).
    assert sorted(map(json.loads, resumed), key=str) == sorted(map(json.loads, full), key=str)
    before = json.loads((pope_run / "metrics.json").read_text())["methods"]
    assert metrics["methods"]["baseline"]["metrics"] == before["baseline"]["metrics"]


def test_sampled_protocol_is_recorded_and_reproducible(model_path, data, pope_run, tmp_path):
    """--do-sample: the references' decoding (temperature 1, per-sample seeds), named in the
    metrics and the report's title; the same seed gives the same answers."""
    answers = []
    for run in ("a", "b"):
        argv = pope_argv(model_path, data, tmp_path / run, "--limit", "4", "--do-sample",
                         "--seed", "5", "--max-new-tokens", "6", "--method", "vcd")  # fmt: skip
        assert run_cli(argv) == 0
        lines = [json.loads(line) for line in (tmp_path / run / "predictions.jsonl").open()]
        answers.append(sorted((ln["key"], ln["method"], ln["answer"]) for ln in lines))
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["settings"]["decoding"] == "sample"
    assert "(sampled, temperature 1)" in (tmp_path / "a" / "report.md").read_text()
    assert "(greedy)" in (pope_run / "report.md").read_text()
    assert answers[0] == answers[1]


def test_chair_end_to_end(model_path, data, tmp_path):
    argv = ["chair", "--model", model_path, "--images", str(data / "images"), "--out",
            str(tmp_path), "--instances", str(data / "instances.json"), "--captions",
            str(data / "captions.json"), "--limit", "4", "--max-new-tokens", "12",
            "--batch-size", "3", "--prompt", "Please describe this image in detail.",
            "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0
    lines = read_lines(tmp_path / "predictions.jsonl")
    assert len(lines) == 4 and all(ln["method"] == "baseline" for ln in lines)
    assert len({ln["image_id"] for ln in lines}) == 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["chair"]["drop_incomplete_sentence"] is True  # auto, 12 <= 64
    got = metrics["methods"]["baseline"]["metrics"]
    mentions = sum(len(ln["objects"]) for ln in lines)
    hallucinated = sum(len(ln["hallucinated"]) for ln in lines)
    assert got["n_captions"] == 4 and got["n_mentions"] == mentions
    assert got["chair_s"] == pytest.approx(100 * sum(bool(ln["hallucinated"]) for ln in lines) / 4)
    assert got["chair_i"] == pytest.approx(100 * hallucinated / mentions if mentions else 0.0)
    # GT: one instance each, plus "car" from the caption file for image 10.
    gt = {10 + i: {["cup", "car", "boat", "bird"][i % 4]} for i in range(5)}
    gt[10].add("car")
    covered = sum(len(set(ln["objects"]) & gt[ln["image_id"]]) for ln in lines)
    n_gt = sum(len(gt[ln["image_id"]]) for ln in lines)
    assert got["recall"] == pytest.approx(100 * covered / n_gt)
    assert "## CHAIR" in (tmp_path / "report.md").read_text()


def test_method_syntax():
    one = parse_method_arg("var+vhr=var;vhr:alpha=2,layers=last")
    assert one.name == "var+vhr"
    assert one.interventions == ({"name": "var"}, {"name": "vhr", "alpha": 2, "layers": "last"})
    assert parse_method_arg("vhr:alpha=2").name == "vhr:alpha=2"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_method_arg("baseline=vhr")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_method_arg("empty=")


def test_bad_input_exits_2(model_path, data, tmp_path, capsys):
    assert run_cli(pope_argv(model_path, data, tmp_path / "a", "--method", "nosuch")) == 2
    assert "unknown intervention 'nosuch'" in capsys.readouterr().err
    argv = pope_argv(model_path, data, tmp_path / "b") + ["--data", str(tmp_path / "none.json")]
    assert run_cli(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = ["chair", "--images", str(data / "images"), "--out", str(tmp_path / "c")]
    assert run_cli(argv) == 2
    assert "--instances" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_actors_match_one_process(ray_cluster, pope_run, model_path, data, tmp_path):
    """Two CPU actors, 2 in flight on each: the baseline predictions equal the local run's."""
    argv = pope_argv(model_path, data, tmp_path, "--limit", "6", "--batch-size", "2",
                     "--max-new-tokens", "6", "--seed", "3", "--ray", "--workers", "2")  # fmt: skip
    assert run_cli(argv) == 0
    local = [ln for ln in read_lines(pope_run / "predictions.jsonl") if ln["method"] == "baseline"]
    sharded = read_lines(tmp_path / "predictions.jsonl")
    assert sorted(sharded, key=str) == sorted(local, key=str)


def test_lvlm_fix_main_eval(model_path, data, tmp_path):
    pytest.importorskip("lvlm_fix.service.launch")
    from lvlm_fix.cli import main

    argv = ["eval", *pope_argv(model_path, data, tmp_path, "--limit", "2", "--max-new-tokens", "4")]
    assert main(argv) == 0
    assert len(read_lines(tmp_path / "predictions.jsonl")) == 4


def test_subset_file_selects_the_same_samples(pope_run, model_path, data, tmp_path, capsys):
    argv = pope_argv(model_path, data, tmp_path / "same", "--subset", str(pope_run / "subset.json"),
                     "--max-new-tokens", "2")  # fmt: skip
    assert run_cli(argv) == 0
    mine = json.loads((tmp_path / "same" / "subset.json").read_text())["keys"]
    assert mine == json.loads((pope_run / "subset.json").read_text())["keys"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": ["tiny_pope_random/999"]}))
    argv = pope_argv(model_path, data, tmp_path / "bad", "--subset", str(other))
    assert run_cli(argv) == 2
    assert "not in the data" in capsys.readouterr().err


def test_worker_feeds_its_engine_a_queue(model_path, data, monkeypatch):
    """EvalWorker.run keeps `in_flight` requests in the engine, refilled as each finishes, and
    gives every unit back once, with the tokens it gets alone."""
    worker = EvalWorker(ModelSpec(model_path))
    lvlm, submit, held = worker.lvlm, worker.lvlm.submit, []

    def watched(samples, *args, listener, **kwargs):
        def listen(event):  # on the engine's thread: its counts are consistent there
            held.append(lvlm.engine.running + lvlm.engine.waiting)
            listener(event)

        return submit(samples, *args, listener=listen, **kwargs)

    monkeypatch.setattr(lvlm, "submit", watched)
    images = [str(data / "images" / f"img{i % 5}.png") for i in range(10)]
    units = [
        WorkUnit("Is there a cup in the image?", image, seed=i) for i, image in enumerate(images)
    ]
    params = GenerationParams(max_new_tokens=6)
    try:
        done = dict(worker.run(units, [], params, in_flight=3))
        assert sorted(done) == list(range(10)) and max(held) == 3
        for index in (0, 9):
            [alone] = lvlm.generate([worker._sample(units[index])], [], params)
            assert done[index].token_ids == alone.token_ids
    finally:
        worker.close()
