# The two set-up commands of the README: `make demo` (the main job on the embedded stack)
# and `make test` (the test suite). Both create the Python 3.12 virtualenv and install what
# is missing first.
SHELL := /bin/bash
VENV ?= .venv
# Python 3.12: pyenv's 3.12 when there is one, else a python3.12 on PATH that runs.
PYTHON312 ?= $(shell (d=$$(pyenv prefix 3.12 2>/dev/null || pyenv prefix 3.12.1 2>/dev/null) && test -x $$d/bin/python3.12 && echo $$d/bin/python3.12) || (python3.12 -c '' 2>/dev/null && command -v python3.12))
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test system-deps venv lint clean readme bench bench-readme

system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install python3.12 or pyenv 3.12.1"; exit 1; }

$(BIN)/.installed: setup.cfg pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON312) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/prompt-tasks demo

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check prompt_tasks workers tests benchmarks beat_schedule.py

# Rerun every benchmark scenario (results in benchmarks/results/) and regenerate the README's
# Performance tables from them; bench-readme only regenerates the tables.
bench: venv
	$(BIN)/python -m benchmarks.suite

bench-readme: venv
	$(BIN)/python -m benchmarks.readme

# Regenerate the README's configuration table from the settings' fields.
readme: venv
	$(BIN)/python -c 'import re, pathlib; from prompt_tasks.stack.env import settings_markdown as t; \
	p = pathlib.Path("README.md"); b, e = "<!-- settings:begin -->", "<!-- settings:end -->"; \
	p.write_text(re.sub(re.escape(b) + ".*?" + re.escape(e), lambda m: b + "\n" + t() + e, p.read_text(), flags=re.S))'

clean:
	-$(BIN)/prompt-tasks stack down
	rm -rf $(VENV) .state
