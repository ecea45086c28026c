# Two commands do everything on a fresh machine: `make serve` and `make test`.
# Both install from requirements.lock (every package pinned), so a release upstream can't change
# what a fresh clone gets. `make lock` regenerates the locks from pyproject.toml.
VENV ?= .venv
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
EXTRAS := serve,eval,dev,split
# The lowest transformers pyproject allows: CI also tests against it.
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
# pip's own resolver, told to keep the machine's CPU build of torch (constraints.txt): an
# unpinned torch would pull several GB of CUDA wheels on a CPU machine.
COMPILE = $(PYTHON) -m piptools compile -q --strip-extras --allow-unsafe --no-emit-index-url \
	--no-emit-find-links --all-build-deps --extra $(EXTRAS) -c constraints.txt

.PHONY: install serve test test-floor test-latest lint lock

# A venv installed from a lock: the locked packages, then the project itself without deps.
# $(1) venv, $(2) lock file.
define install_locked
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --no-deps -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(1)/bin/python -m pip check
	touch $(1)/.installed
endef

$(VENV)/.installed: requirements.lock pyproject.toml
	$(call install_locked,$(VENV),requirements.lock)

.venv-floor/.installed: requirements-floor.lock pyproject.toml
	$(call install_locked,.venv-floor,requirements-floor.lock)

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/lvlm-fix serve --host $(HOST) --port $(PORT)

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# The suite at the transformers floor (CI runs it after `make test`).
test-floor: .venv-floor/.installed
	HF_HUB_OFFLINE=1 .venv-floor/bin/python -m pytest -q

# The newest versions pyproject allows, resolved today, in a venv of its own (not locked).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c constraints.txt -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Needs pip-tools (in the dev extra): `make lock PYTHON=.venv/bin/python`.
lock:
	$(COMPILE) -o requirements.lock pyproject.toml
	echo "transformers==$(TRANSFORMERS_FLOOR)" > .floor-constraint.txt
	$(COMPILE) -c .floor-constraint.txt -o requirements-floor.lock pyproject.toml
	rm .floor-constraint.txt
