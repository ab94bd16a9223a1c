# raytrain: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: demo test test-fast lint sysdeps venv bench bench-recipes clean

sysdeps:  ## Debian packages the corpus generator and tests need (espeak-ng; wamerican: /usr/share/dict/words)
	@if ! command -v espeak-ng >/dev/null 2>&1 || [ ! -f /usr/share/dict/words ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; echo "installing espeak-ng and wamerican with sudo (needs your password)"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng wamerican >/dev/null \
	  || { echo "could not install espeak-ng and wamerican: install them with your package manager and re-run"; exit 1; }; \
	fi

$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
# resemblyzer (speaker encoder of the voice-conversion metrics and loss; weights in the wheel) without its
# dependencies: `webrtcvad` imports pkg_resources, gone from the setuptools torch brings; webrtcvad-wheels,
# a main dependency, provides the same module. Its others (librosa, numpy, scipy, torch) are main ones.
	$(PIP) install -q -c constraints.txt --no-deps resemblyzer==0.1.4
	touch $@

venv: $(VENV)/.stamp

demo: sysdeps venv  ## prepare a tiny corpus and run separation_tiny.yaml on local Ray with MLflow
	$(VENV)/bin/raytrain demo

test: sysdeps venv  ## the whole suite (unit + integration on local Ray)
	$(PY) -m pytest tests -q -rs --durations=25

test-fast: sysdeps venv  ## unit tests only (no Ray)
	$(PY) -m pytest tests/unit -q

lint: venv
	$(VENV)/bin/ruff check raytrain datasets_prep tests bench
	$(VENV)/bin/mypy raytrain datasets_prep

bench: venv
	$(PY) bench/overhead.py

bench-recipes: sysdeps venv  ## train every tiny recipe to its quality bars (tens of minutes on 2 cores)
	$(PY) bench/recipes.py --all

clean:
	rm -rf runs data out .pytest_cache
