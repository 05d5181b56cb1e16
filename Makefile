# The two set-up commands of the README. Each creates the environment it needs in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## run: the default recipe (scikit-learn digits, 10 clients, FedAvg)
run: $(VENV)/.installed
	$(PY) -m lightning_fedprune run recipes/digits_fedavg.yaml

## test: the test suite (CPU only, a few minutes)
test: $(VENV)/.installed
	$(PY) -m pytest -q

## bench: engine overhead against a plain PyTorch loop
bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) runs
