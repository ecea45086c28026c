"""What a fresh install gets: a lock that matches pyproject, a light core, one version."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

import lvlm_fix

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _locked(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        requirement = line.split(";")[0].strip()
        if "==" in requirement and not requirement.startswith("#"):
            package, _, pinned = requirement.partition("==")
            pins[package.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def _declared() -> list[Requirement]:
    lines = list(PYPROJECT["dependencies"])
    for extra in ("serve", "eval", "dev"):
        lines += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_locks_pin_every_declared_requirement_within_its_range():
    for lock in ("requirements.lock", "requirements-floor.lock"):
        pins = _locked(lock)
        for requirement in _declared():
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            name = requirement.name.lower().replace("_", "-")
            assert name in pins, f"{lock} does not pin {name}; run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock} pins {name}=={pins[name]}, outside pyproject's {requirement}"
            )


def test_floor_lock_is_the_transformers_floor():
    [floor] = [r for r in _declared() if r.name == "transformers"]
    lowest = next(s.version for s in floor.specifier if s.operator == ">=")
    assert Version(_locked("requirements-floor.lock")["transformers"]) == Version(lowest)


def test_one_version():
    assert version("lvlm-fix") == lvlm_fix.__version__
    assert (Path(lvlm_fix.__file__).parent / "py.typed").exists()


def test_core_generate_imports_no_serving_or_eval_package(tiny_llava_path):
    """`pip install lvlm-fix` (no extras) must be enough for `LVLM.generate`."""
    script = f"""
import sys
from PIL import Image
from lvlm_fix import LVLM, GenerationParams, Sample
lvlm = LVLM.from_pretrained({str(tiny_llava_path)!r})
sample = Sample("Describe the image.", (Image.new("RGB", (32, 32), "red"),))
lvlm.generate([sample], [{{"name": "vhr"}}], GenerationParams(max_new_tokens=2))
extras = ("ray", "fastapi", "uvicorn", "prometheus_client", "starlette",
          "matplotlib", "nltk", "lemminflect", "multipart")
print(sorted(name for name in extras if name in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
