# Every target sets itself up first (virtualenv, dependencies, PostgreSQL binaries).
PY := .venv/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup demo test sim chaos soak lint long-code protos bench bench-soak clean

setup:
	@bash scripts/bootstrap.sh

## The main job: the sharded bank demo on embedded defaults.
demo: setup
	$(PY) -m bank_demo run

## The test suite (fast, representative; what CI runs).
test: setup
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/long_code.py --check
	$(PYTEST) --timeout=600

## The deterministic simulation: `make sim SEEDS=N` runs seeds 0..N-1 (default 20000),
## `make sim SEED=S` replays one and prints its story.
sim: setup
	$(PY) -m tests.sim $(if $(SEED),--seed $(SEED),--seeds $(or $(SEEDS),20000))

## The whole failure-injection suite (Toxiproxy partitions, kills).
chaos: setup
	$(PYTEST) --timeout=1800 -m "chaos or not soak"

## Long randomized soak runs.
soak: setup
	$(PYTEST) --timeout=3600 -m soak

## Throughput and latency against raw PostgreSQL 2PC, side by side (about 6 minutes).
bench: setup
	$(PY) bench/transfers.py --out out/bench.json

## The coordinator's memory over a 10-minute run.
bench-soak: setup
	$(PY) bench/transfers.py --shards 2 --concurrency 16 --soak-minutes 10 --out out/bench-soak.json

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy .
	$(PY) scripts/long_code.py --check

## Classes over 120 lines and functions over 60 in coordinator/ and participant/
## (issue 13: each should fit in one screen).
long-code: setup
	$(PY) scripts/long_code.py

## Regenerate twopc_pb/ from protos/ (commit the result).
protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf .venv out
