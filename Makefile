# The two commands: `make demo` runs the main job, `make test` runs the CPU test suite.
# Both set everything up themselves (scripts/bootstrap.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast setup lint

setup:
	./scripts/bootstrap.sh

demo: setup
	$(PY) -m fastmem.demo $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not slurm" $(ARGS)

lint: setup
	$(PY) -m ruff check fastmem pipelines kernels tests benchmarks
