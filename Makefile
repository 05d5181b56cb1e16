# The two set-up commands of the README. Each creates the environment it needs in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench bench-fedml fedml-demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# the FedML deployment's extra packages (fedml, grpcio, moto)
$(VENV)/.installed-fedml: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,fedml]'
	touch $@

# an MQTT broker for the MQTT_S3 tests and one-machine runs: amqtt (pip), in an environment of
# its own because its pins (typer, pyyaml) conflict with fedml's. Production brokers: mosquitto
# (`apt-get install -y mosquitto`), which is used instead whenever it is installed.
AMQTT_VERSION ?= 0.12.1
$(VENV)/mqtt-broker/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(VENV)/mqtt-broker
	$(VENV)/mqtt-broker/bin/python -m pip install --quiet 'amqtt==$(AMQTT_VERSION)'
	touch $@

## run: the default recipe (scikit-learn digits, 10 clients, FedAvg)
run: $(VENV)/.installed
	$(PY) -m lightning_fedprune run recipes/digits_fedavg.yaml

## test: the test suite (CPU only, a few minutes; the FedML tests start real processes)
test: $(VENV)/.installed-fedml $(VENV)/mqtt-broker/.installed
	$(PY) -m pytest -q

## lint: ruff (configured in pyproject.toml)
lint: $(VENV)/.installed
	$(PY) -m ruff check lightning_fedprune tests benchmarks recipes examples

## bench: engine overhead against a plain PyTorch loop
bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

## bench-fedml: a GRPC deployment on this machine against the simulator
bench-fedml: $(VENV)/.installed-fedml
	$(PY) benchmarks/fedml_vs_simulation.py

## fedml-demo: server + 3 client processes on this machine, compared with the simulator
fedml-demo: $(VENV)/.installed-fedml
	$(PY) examples/fedml_one_machine.py

clean:
	rm -rf $(VENV) runs
