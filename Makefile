# crystal-lm: every target creates/refreshes the local virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast clean

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints-cpu.txt pins torch==2.13.0 (the CPU wheel) so no CUDA build is pulled; the mlip extra
	# (CHGNet, weights inside its wheel) is installed so that its tests run too.
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e ".[test,mlip]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crystal-lm demo --out outputs/demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) outputs
