# Two commands on a fresh machine:  `make demo`  (all three stages on the CPU demo)
#                                   `make test`  (the test suite)
PYTHON ?= python3
VENV ?= .venv
# GPU users pick their CUDA build, e.g. `make demo TORCH_SPEC="torch==2.5.1"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# Written from the torch installed first; every later install takes it (`pip install -c`), so
# a package that depends on torch cannot replace the chosen build (README: Set-up).
CONSTRAINTS := $(VENV)/constraints.txt
DEMO_DIR ?= runs/demo
DEMO_DATA ?= demo_data
DEMO := model=tiny data=demo scale=demo data.root=$(DEMO_DATA)
DEMO_CHAT ?= $(DEMO_DIR)/chat

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import torch; print(f'torch=={torch.__version__}')" > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

# Rebuilt when the demo set's generators change (e.g. a set built before it had val/).
$(DEMO_DATA)/.built: $(wildcard data_recipes/demo/*.py) | install
	$(VENV)/bin/qwenvl-data demo --out $(DEMO_DATA)
	touch $@

demo: install $(DEMO_DATA)/.built
	$(VENV)/bin/qwenvl-train stage=pretrain $(DEMO) run_dir=$(DEMO_DIR)/pretrain
	$(VENV)/bin/qwenvl-train stage=multitask $(DEMO) run_dir=$(DEMO_DIR)/multitask init_from=$(DEMO_DIR)/pretrain
	$(VENV)/bin/qwenvl-train stage=sft $(DEMO) run_dir=$(DEMO_DIR)/sft init_from=$(DEMO_DIR)/multitask
	# Talk to the SFT model: one grounding question about an unseen scene; prints the answer
	# and, when it holds a box, the image with the box drawn (a tiny model answers poorly).
	$(PY) scripts/demo_chat_prompts.py --out $(DEMO_CHAT)
	$(VENV)/bin/qwenvl-chat $(DEMO_DIR)/sft/export --batch $(DEMO_CHAT)/prompts.jsonl \
		--out $(DEMO_CHAT)/answers.jsonl --box-dir $(DEMO_CHAT)/boxes --max-new-tokens 48
	# Evaluate the SFT model on the held-out demo shards (demo_data/val/): task, metric, value.
	# A tiny model trained for minutes scores near zero (README: Evaluation).
	$(VENV)/bin/qwenvl-eval $(DEMO_DIR)/sft --root $(DEMO_DATA) --shards 'val/*.tar' \
		--limit 32 --table

# Two pytest workers, each taking whole test files (module fixtures such as a reference run
# are built once): the suite's single-process tests leave a core idle otherwise.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs $(DEMO_DATA) .pytest_cache
