# Two entry points that work on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install browser quickstart test lint
install: $(VENV)/.installed

# Debian's Chromium drives the demo's end-to-end browser test (apt needs root, as on CI).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

quickstart: $(VENV)/.installed
	$(PY) scripts/quickstart.py

# pytest exits 5 when no test ran, which fails this target like any other failure.
test: $(VENV)/.installed browser
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
