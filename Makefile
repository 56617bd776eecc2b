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

.PHONY: install app test lint browser
install: $(BIN)/.installed

# the browser tests drive Debian's Chromium (no browser download); installed when missing and apt-get is usable
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser tests will be skipped"

app: install
	$(BIN)/studio app

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
