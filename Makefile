# The two commands a new user needs:  `make demo` (set up + run the main demo) and `make test` (set up + run the tests).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEBIAN_DATA := dataset-fashion-mnist tuxpaint-stamps-default openclipart-png fonts-noto-color-emoji

.PHONY: setup data demo test bench clean

setup: $(VENV)/.installed

# torch first, from the pinned CPU build: a bare `torch` requirement could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Real offline datasets come from Debian packages (DESIGN.md §6); needs root or sudo.
data:
	@if dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1; then echo "Debian data packages present."; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA); fi

demo: setup data
	$(PY) scripts/demo.py

test: setup data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
