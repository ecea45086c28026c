"""`lvlm-fix eval` end to end on the gym's benchmark files and the bundled model (subset)."""

from __future__ import annotations

import json

import pytest

from lvlm_fix.cli import main as cli
from lvlm_fix.gym.make_eval import main as make_eval


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
