# Two set-up commands: `make app` (install, then launch the app on the embedded model) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

# The install takes about 6.5 GB (torch 2.14.1 is a CUDA build). pip unpacks into a folder on the venv's own disk,
# keeps no cache copy, and a failed install reports the free space, since a full disk is its usual cause.
PIP_TMP := $(VENV)/.pip-tmp
PIP := TMPDIR=$(abspath $(PIP_TMP)) PIP_NO_CACHE_DIR=1 $(BIN)/pip install --quiet
DISK_REPORT := { echo "install failed; free space (it needs about 6.5 GB):" >&2; df -h . $(PIP_TMP) >&2; exit 1; }

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(PIP_TMP)
	$(PIP) --upgrade pip || $(DISK_REPORT)
	# the CPU machines serve these two wheels from disk; uv/poetry would download gigabytes
	$(PIP) torch==2.14.1 torchvision==0.29.1 || $(DISK_REPORT)
	$(PIP) -e ".[dev]" || $(DISK_REPORT)
	rm -rf $(PIP_TMP)
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
