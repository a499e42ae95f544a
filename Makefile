# Two entry points do all set-up on a fresh machine:
#   make demo   install, then `patchatlas build` on the embedded default (offline, CPU is enough)
#   make test   install, then the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= build
# torch and torchvision pinned to the releases this project is tested with; pyproject.toml
# admits a compatible range for other installs.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# The oldest datasets release pyproject.toml admits, in an environment of its own:
# tests/test_datasets_floor.py loads a freshly written dataset folder with it.
FLOOR_VENV ?= .venv-ds3
DATASETS_FLOOR := datasets[vision]==3.0.*

# The random-kill test in its full form: 12 SIGKILLs at seeded moments of a tiny build (with the
# HTML site), each resumed and compared byte for byte with an uninterrupted build (nightly).
CRASH_KILLS ?= 12

.PHONY: install browser datasets-floor demo test crash-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[full,test]'
	touch $@

install: $(VENV)/.installed

# A real browser for tests/test_browser.py, installed only for the tests.
browser:
	@# A real browser for tests/test_browser.py: Debian's chromium and its chromedriver.
	@if command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "note: apt-get could not install chromium chromium-driver; the browser tests will be skipped"; \
	else echo "note: no chromedriver, and no root apt-get to install chromium-driver; the browser tests will be skipped"; fi

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/patchatlas build --out $(OUT)

$(FLOOR_VENV)/.installed:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet '$(DATASETS_FLOOR)' pyarrow
	touch $@

datasets-floor: $(FLOOR_VENV)/.installed

# The lint first ([tool.ruff] in pyproject.toml): it takes a second and fails before the tests' minutes.
test: install browser datasets-floor
	$(BIN)/ruff check .
	PATCHATLAS_DATASETS_FLOOR_PYTHON=$(abspath $(FLOOR_VENV))/bin/python $(BIN)/python -m pytest -q

crash-test: install
	PATCHATLAS_CRASH_KILLS=$(CRASH_KILLS) $(BIN)/python -m pytest -q -s tests/test_crash_random.py

clean:
	rm -rf $(OUT)
