# Every target sets itself up first (virtualenv, dependencies, PostgreSQL binaries).
PY := .venv/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup demo test chaos soak lint protos bench clean

setup:
	@bash scripts/bootstrap.sh

## The main job: the sharded bank demo on embedded defaults.
demo: setup
	$(PY) -m bank_demo run

## The test suite (fast, representative; what CI runs).
test: setup
	$(PY) scripts/gen_protos.py --check
	$(PYTEST) --timeout=600

## The whole failure-injection suite (Toxiproxy partitions, kills).
chaos: setup
	$(PYTEST) --timeout=1800 -m "chaos or not soak"

## Long randomized soak runs.
soak: setup
	$(PYTEST) --timeout=3600 -m soak

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy .

## Regenerate twopc_pb/ from protos/ (commit the result).
protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf .venv out
