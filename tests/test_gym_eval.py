"""`lvlm-fix eval` end to end on the gym's benchmark files and the bundled model (subset)."""

from __future__ import annotations

import json

import pytest

from lvlm_fix.cli import main as cli
from lvlm_fix.gym.make_eval import main as make_eval
from lvlm_fix.methods import dyvte_exits
from lvlm_fix.model import default_model_path


@pytest.fixture(scope="module")
def gym_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("gym_eval")
    make_eval([str(out)])
    return out


def test_pope_on_gym_files(gym_eval, tmp_path):
    data = [f"--data={gym_eval}/gym_pope_{split}.json" for split in ("random", "adversarial")]
    code = cli(["eval", "pope", "--images", str(gym_eval / "images"), "--out", str(tmp_path),
                *data, "--limit", "12", "--batch-size", "12", "--no-progress",
                "--method", "vhr"])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    baseline = metrics["methods"]["baseline"]["metrics"]["gym_pope_random"]
    assert baseline["n"] == 12 and baseline["acc"] >= 0.75  # the bundled model sees
    assert "| vhr |" in (tmp_path / "report.md").read_text()


def test_chair_on_gym_files(gym_eval, tmp_path):
    code = cli(["eval", "chair", "--images", str(gym_eval / "images"), "--out", str(tmp_path),
                "--instances", str(gym_eval / "instances_gym.json"),
                "--synonyms", str(gym_eval / "synonyms_gym.txt"),
                "--prompt-file", str(gym_eval / "chair_prompt.txt"),
                "--limit", "6", "--batch-size", "6", "--no-progress"])  # fmt: skip
    assert code == 0
    chair = json.loads((tmp_path / "metrics.json").read_text())["methods"]["baseline"]["metrics"]
    assert chair["n_captions"] == 6 and chair["recall"] >= 50  # captions name the true objects


def test_dyvte_exit_counter_on_gym_files(gym_eval, capsys):
    dyvte_exits.main(["--model", str(default_model_path()), "--images", str(gym_eval / "images"),
                      "--data", str(gym_eval / "gym_pope_random.json"), "--limit", "4",
                      "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gym_pope_random: 4 questions, exit on ")
    per_layer = [line for line in lines if line.startswith("  layer ")]
    assert len(per_layer) == 3  # one router per layer but the last of the 4-layer model
    for line in per_layer:
        assert line.endswith("/4") and "agree" in line
