# The README's two commands. Each sets up .venv on first use (scripts/setup.sh: the CPU build
# torch==2.13.0 where there is no GPU), then runs.
PY := .venv/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test test-fast bench gpu-check clean
train:  ## set up, then train the tiny model on the built-in corpus (pass Hydra overrides in ARGS="...")
	@scripts/setup.sh
	$(PY) -m experiments.train $(ARGS)

test:  ## set up with test dependencies, then run the whole suite
	@scripts/setup.sh test
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast:  ## the quick lane while you work: unit tests + a distributed checkpoint smoke test (a few minutes)
	@scripts/setup.sh test
	$(PY) -m pytest -m "not slow" tests/unit tests/distributed/test_checkpoint_dist.py $(PYTEST_ARGS)

bench:  ## step time, tokens/s and MFU of tiny and small (writes docs/benchmarks/*.json)
	@scripts/setup.sh
	$(PY) -m experiments.bench_models

gpu-check:  ## on a GPU machine, inside --budget-s (480 s): gpu tests, copy/NCCL, Baichuan-7B-width stack table (OUT=dir; see README)
	@scripts/gpu_check.sh $(OUT)

clean:
	rm -rf runs multirun outputs .pytest_cache
