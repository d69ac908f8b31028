# `make demo`: set up .venv and run the main job on the built-in data.
# `make test`: set up .venv and run the test suite (the GPU tier deselected: pytest reports "N deselected").
# `make test-gpu`: the GPU tier alone (compiled Triton kernels on CUDA, CUDA determinism); needs a CUDA GPU.
# `make bench`: set up .venv and run `scdd stage=bench` (throughput, recover breakdown, projection).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

$(STAMP): setup.py
	bash .ci/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	# foolbox only for its bundled real CIFAR/ImageNet PNGs (test data); its deps are not needed.
	$(VENV)/bin/pip install -q --no-deps foolbox
	touch $(STAMP)

demo: setup
	$(VENV)/bin/scdd $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q tests -m "not gpu" $(ARGS)

test-gpu: setup
	TRITON_INTERPRET=0 $(VENV)/bin/python -m pytest -q -m gpu tests/gpu $(ARGS)

bench: setup
	$(VENV)/bin/scdd stage=bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun *.egg-info
