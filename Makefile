# Two set-up commands: `make app` (install, then launch the app on the embedded model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU machines serve these two wheels from disk; uv/poetry would download gigabytes
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install app test lint
install: $(BIN)/.installed

app: install
	$(BIN)/studio app

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
