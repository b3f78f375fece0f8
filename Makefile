# The two commands a new user needs:  `make demo` (set up + run the main demo) and `make test` (set up + run the tests).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The real offline datasets, and the headless browser of the audit report test (tests/nlip_cli/test_audit_report_browser.py).
DEBIAN_DATA := dataset-fashion-mnist tuxpaint-stamps-default openclipart-png fonts-noto-color-emoji chromium chromium-driver

.PHONY: setup data demo test test-latest lock bench clean

setup: $(VENV)/.installed

# Everything from the lock of tested versions (constraints.txt), torch first: pip takes torch/torchvision from the
# builds on this machine's disk (a bare `torch` requirement could pull a multi-GB CUDA build from PyPI).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Early warning for the next upstream release: a fresh venv with the newest release of every dependency (the
# pyproject ranges' caps lifted; torch/torchvision: the newest builds this machine can install), then the model,
# captioning and trainer tests. Prints the versions it used. When it passes, `make lock` records them.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_TESTS := tests/modeling_nlip/test_modeling_nlip.py tests/modeling_nlip/test_modeling_nlip_common.py \
	tests/modeling_nlip/test_captioning.py tests/modeling_nlip/test_captioning_common.py \
	tests/modeling_nlip/test_pretraining.py tests/trainers/test_trainer.py tests/trainers/objectives
test-latest: data
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q --upgrade torch torchvision
	$(LATEST_PY) -m pip install -q --no-deps -e .
	$(LATEST_PY) -m pip install -q --upgrade $$($(LATEST_PY) .ci/unpinned_requirements.py test)
	$(LATEST_PY) .ci/unpinned_requirements.py --versions
	$(LATEST_PY) -m pytest -q $(LATEST_TESTS)

# Refresh the lock from the venv `make test-latest` built and tested (then run `make test`, and move the pyproject
# floors and modeling_nlip's tested transformers window to the new versions).
lock:
	@test -x $(LATEST_PY) || { echo "Run make test-latest first: the lock records the versions it tested."; exit 1; }
	{ echo "# Tested versions (pip constraints), written by make lock from $(LATEST_VENV) on $$(date -u +%F)."; \
	  $(LATEST_PY) -m pip freeze --exclude-editable; } > constraints.txt
	@echo "constraints.txt updated; now run: make clean test"

# Real offline datasets come from Debian packages; needs root or sudo.
data:
	@if dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1; then echo "Debian data packages present."; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA); fi

demo: setup data
	$(PY) nlip_cli/demo.py

# 2 worker processes (pytest-xdist) by default, one file per worker at a time; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf $(VENV) $(LATEST_VENV) outputs .pytest_cache
