# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MMFUSE := $(VENV)/bin/mmfuse
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test test-fast demo bench-shard clean

# The venv is (re)built when missing or when pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The whole pipeline on the embedded default: synthetic data, local shards, verification
# (later stages append pre-training and fine-tuning).
demo: $(STAMP)
	$(MMFUSE) synth output.path=$(DEMO)/raw num_samples=512 seed=0
	$(MMFUSE) shard --config configs/data/shapes.yaml input.path=$(DEMO)/raw/manifest.parquet output.path=$(DEMO)/shards
	$(MMFUSE) verify $(DEMO)/shards

bench-shard: $(STAMP)
	$(PY) bench/shard.py

clean:
	rm -rf $(DEMO) .pytest_cache
