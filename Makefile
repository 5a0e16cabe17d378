# caption-pipeline: `make help` lists the targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
BENCH_STAMP := $(VENV)/.installed-bench
DEV_STAMP := $(VENV)/.installed-dev
MANIFEST ?=
OUT ?=
JOB ?=
ARGS ?=

.PHONY: help setup demo demo-batch demo-quality caption lint test test-ray bench bench-ratelimit bench-images bench-crash clean bench-ray \
	bench-export bench-sources docs-screenshot

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the package with test extras

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,ray]'
	@touch $(RAY_STAMP)

demo: $(STAMP) ## caption data/sample/images.csv against the bundled local simulator
	$(BIN)/python -m pipeline demo

demo-batch: $(STAMP) ## the same photos online and through the batch lane; compare captions and cost
	$(BIN)/python -m pipeline demo --batch

demo-quality: $(STAMP) ## the quality gate and chained prompts on the sample photos: what was caught, re-asked, what it cost
	$(BIN)/python -m pipeline demo --quality

caption: $(STAMP) ## caption MANIFEST=images.csv [OUT=dir] [ARGS="..."], or JOB=jobs/NAME.toml
	@test -n "$(MANIFEST)$(JOB)" || { echo "usage: make caption MANIFEST=images.csv [OUT=dir] [ARGS=...] | JOB=jobs/NAME.toml [ARGS=...]" >&2; exit 2; }
	$(if $(JOB),$(BIN)/python -m pipeline run "$(JOB)" $(if $(OUT),--out "$(OUT)") $(ARGS),$(BIN)/python -m pipeline caption "$(MANIFEST)" $(if $(OUT),--out "$(OUT)") $(ARGS))

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $(DEV_STAMP)

lint: $(DEV_STAMP) ## ruff over everything, mypy --strict over pipeline/
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP) ## run the test suite (the Ray engine's tests: make test-ray)
	$(BIN)/python -m pytest -m "not ray"

test-ray: $(RAY_STAMP) ## --engine ray tests on a local Ray instance (installs the ray extra)
	$(BIN)/python -m pytest tests/ray -m ray -p no:cacheprovider

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## pipeline vs an openai-SDK script (images/s, CPU, RSS); manifest and resume at 1M rows
	$(BIN)/python tests/bench/bench_client.py
	$(BIN)/python tests/bench/bench_scale.py

bench-ratelimit: $(STAMP) ## achieved % of a server's RPM/TPM limit and 429 share, three pacing modes
	$(BIN)/python tests/bench/bench_ratelimit.py

bench-images: $(STAMP) ## image stage vs a plain Pillow loop on 6000x4000 JPEGs; event-loop lag
	$(BIN)/python tests/bench/bench_images.py

bench-crash: $(STAMP) ## rows redone after SIGKILL and time to stop on SIGTERM
	$(BIN)/python tests/bench/bench_crash.py

bench-ray: $(RAY_STAMP) ## images/s: local engine vs --engine ray with 1 and 2 actors (3000x2000 JPEGs)
	$(BIN)/python tests/bench/bench_ray.py

docs-screenshot: $(STAMP) ## regenerate docs/gallery.png from a real demo run (needs chromium)
	$(BIN)/python docs/make_screenshot.py

bench-export: $(STAMP) ## export 1M rows to JSONL and sidecars vs a pandas script (rows/s, peak RSS)
	$(BIN)/python tests/bench/bench_export.py

bench-sources: $(STAMP) ## read 1M-row CSV/JSONL/Parquet manifests and 100 shards: rows/s, peak RSS
	$(BIN)/python tests/bench/bench_sources.py

clean: ## remove demo output
	rm -rf out data/sample/out
