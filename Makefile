# Fresh-machine entry points: both targets create the virtual environment themselves.
#   make demo   train LeNet-5 with channel masks on the bundled MNIST-10k, export, slim, validate, report
#   make test   the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-clean test lint clean

venv: $(STAMP)

# torch is pinned through constraints.txt to the CPU build offered on this machine
# (an unpinned torch pulls several GB of CUDA wheels); pyproject.toml keeps a range for real users.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

# The demo trains with DEMO_THREADS PyTorch threads (the README's figures: 2, on a 2-core machine; latency is
# measured at the recipe's 1 thread). Running it again resumes the finished run: nothing is retrained, the
# model is exported, slimmed and measured again. `make demo-clean` deletes runs/demo to start over.
DEMO_OUT     ?= runs/demo
DEMO_THREADS ?= 2

demo: $(STAMP)
	$(VENV)/bin/onnxslim run models/lenet5_mnist.toml --out $(DEMO_OUT) --resume --threads $(DEMO_THREADS)

demo-clean:
	rm -rf $(DEMO_OUT)

# --reruns 2: a test that crashes its worker (seen: torch CPU backward segfaulting under load on some
# machines) is rerun in a fresh worker (pytest-rerunfailures with pytest-xdist); a real failure fails 3 times.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --reruns 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check onnxslim tests tools

clean:
	rm -rf $(VENV) runs build *.egg-info
