# Fresh-machine entry points: both targets create the virtual environment themselves.
#   make demo   train LeNet-5 with channel masks on the bundled MNIST-10k, export, slim, validate, report
#   make test   the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

# torch is pinned through constraints.txt to the CPU build offered on this machine
# (an unpinned torch pulls several GB of CUDA wheels); pyproject.toml keeps a range for real users.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onnxslim run models/lenet5_mnist.toml --out runs/demo --resume

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

lint: $(STAMP)
	$(VENV)/bin/ruff check onnxslim tests tools

clean:
	rm -rf $(VENV) runs build *.egg-info
