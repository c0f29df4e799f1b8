# The README's two commands: `make train` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STEPS ?=
# Test files run on TEST_WORKERS processes (pytest-xdist), each file's tests on one of them: most
# tests wait on subprocesses (one worker used 1.1 cores): on 2 cores 2 workers took the suite
# from 21.6 to 15.1 minutes (2026-11-30, 473 tests). With 676 tests: 17.9 minutes on 2 workers
# and the same on 3 (the two cores are then busy), on a quiet machine (2026-11-30). With 839 tests
# (Slurm, two hosts, torch 2.11/2.15 smokes): 22.2 minutes on 2 workers (2026-12-03, .ci/run), 23.1 on 3.
# With 840 tests: 12.1 minutes (2026-12-04, .ci/run on a fresh clone), 1,290 s of CPU, 172 % of 2 cores:
# the wall time follows the load of the machine (the 22.2 minutes most likely had another core's worth of work beside them).
TEST_WORKERS ?= 2

.PHONY: setup train test clean

setup:
	@VENV=$(VENV) bash launch/setup.sh

train: setup
	$(VENV)/bin/titan-rw train --config train_configs/debug_cpu.toml $(if $(STEPS),--training.steps $(STEPS),)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf runs .pytest_cache
