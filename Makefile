# cfgx developer targets. `make test` is the command CI runs (.ci/run).
PY ?= python3
PYTEST_ARGS ?=

.PHONY: install test test-all lint demo bench gpu-check ci clean

install:            ## editable install with the dev extras
	$(PY) -m pip install -e ".[dev]"

test:               ## the fast suite (< 10 min on 2 CPU cores); GPU tests skip on CPU
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all:           ## everything, including slow end-to-end runs on ../shared data
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check cfgx tests scripts

demo:               ## train on the embedded digits and sweep s = 0,1,3,7 (<= 5 min on 2 CPU cores)
	$(PY) -m cfgx train

bench:              ## throughput/timing benchmarks (not tests): demo wall time, img/s, Inception img/s, 1 vs 2 processes
	$(PY) scripts/bench_demo.py
	$(PY) scripts/bench_inception.py
	$(PY) scripts/bench_record.py   # bench_out/bench.json, with ratios to the previous record
	$(PY) scripts/bench_ddp.py
	$(PY) scripts/bench_threads.py   # digits training step: 1 process alone vs 2 side by side, thread budget
	$(PY) scripts/bench_pretrained.py   # cfgx vs DiTPipeline on one tiny DiT (needs the [pretrained] extra)

gpu-check:          ## on a CUDA machine: pytest -m gpu, CIFAR train img/s / peak memory / MFU, a 2k-sample sweep
	$(PY) scripts/gpu_check.py

ci: lint test

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
