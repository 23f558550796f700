# The same few commands everywhere: README, CI and developers use these.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint fmt demo bench bench-quick chaos chaos-quick schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with dev extras

test: $(STAMP)  ## every tier: unit, integration (real Redis/S3/emulator), e2e (real worker)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)  ## ruff + mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker api_contracts bench tests

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schema: $(STAMP)  ## rewrite api_contracts/schemas/*.json from the models
	$(BIN)/runcomfy-worker schema --write

demo: $(STAMP)  ## the whole pipeline on embedded Redis, S3 (moto) and the RunComfy emulator
	$(BIN)/runcomfy-worker demo

bench: $(STAMP)  ## benchmarks, a few minutes; results in bench/results/
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

chaos: $(STAMP)  ## 1,000 jobs while workers die and services go down; figures + JSON, exit 1 on a missed target
	$(BIN)/python -m bench.chaos

chaos-quick: $(STAMP)  ## the CI form: 200 jobs, 30 s of faults
	$(BIN)/python -m bench.chaos --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output

profile-poll: $(STAMP)  ## CPU of one status check by package (cProfile + stack samples), under a minute
	$(BIN)/python -m bench.profile_poll

.PHONY: bench-fleet
bench-fleet: $(STAMP)  ## 100,000 jobs seeded in flight across 10 workers: lateness, checks/s, RSS, Redis (about 5 min)
	$(BIN)/python -m bench.fleet
