# The README's two commands: `make train` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STEPS ?=

.PHONY: setup train test clean

setup:
	@VENV=$(VENV) bash launch/setup.sh

train: setup
	$(VENV)/bin/titan-rw train --config train_configs/debug_cpu.toml $(if $(STEPS),--training.steps $(STEPS),)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
